//! Benchmark (not a test): pod sandbox + one container, start to running, through containerd's
//! CRI plugin, the way kubelet drives it: RunPodSandbox + CreateContainer + StartContainer.
//! Median of N (default 20) per runtime handler, on one private containerd, printed side by side.
//!
//!     cargo run --release -p tandem-tests --example cri_bench -- [N]
//!
//! Needs root, the release shim (`cargo build --release -p tandem-shim`) and Debian's containerd.

use std::time::{Duration, Instant};

use tandem_tests::cri::{ContainerSpec, CriEnv, PodSpec};
use tandem_tests::{unique_id, BUSYBOX};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let mut env = CriEnv::start("mode = \"container\"\n")?;
    let mut rows = Vec::new();
    for handler in ["tandem", "runc"] {
        let mut times = Vec::with_capacity(n);
        // One warm-up pod per handler (page cache, first shim exec).
        for i in 0..=n {
            let name = unique_id("bench");
            let spec = PodSpec {
                name: name.clone(),
                handler: handler.into(),
                log_dir: env.net.dir().join("logs").join(&name),
                cgroup_parent: format!("/tandembench-{name}"),
                ..Default::default()
            };
            let c = ContainerSpec {
                name: "app".into(),
                image: BUSYBOX.into(),
                command: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            };
            let t = Instant::now();
            let (pod, cfg) = env.cri.run_pod(&spec)?;
            let cid = env.cri.create_container(&pod, &cfg, &c)?;
            env.cri.start_container(&cid)?;
            let took = t.elapsed();
            anyhow::ensure!(
                env.cri.container_status(&cid)?.state == 1,
                "{handler}: container {cid} not running"
            );
            if i > 0 {
                times.push(took);
            }
            env.cri.teardown_pod(&pod)?;
        }
        rows.push((handler, median(times)));
    }
    let runc = rows.iter().find(|r| r.0 == "runc").map(|r| r.1).unwrap();
    println!(
        "CRI RunPodSandbox + CreateContainer + StartContainer, median of {n} (busybox, CNI bridge)"
    );
    println!("{:<8} {:>10} {:>8}", "handler", "median ms", "vs runc");
    for (h, d) in rows {
        println!(
            "{:<8} {:>10.1} {:>7.2}x",
            h,
            d.as_secs_f64() * 1e3,
            d.as_secs_f64() / runc.as_secs_f64()
        );
    }
    Ok(())
}
