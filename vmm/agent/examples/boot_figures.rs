//! Boot figures of the guest under QEMU TCG (docs/vm-mode.md). Usage:
//!   cargo run -p tandem-agent --example boot_figures -- [runs]
//! Prints, per run: QEMU start → first agent answer (Version), → Shutdown done and QEMU gone;
//! and QEMU start → exit for a bare boot of the same kernel whose /init powers off at once.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use tandem_agent::client::AgentClient;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let agent = common::guest(false);
    let bare = common::guest(true);
    let (mut answer, mut total, mut bare_t) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let mut q = common::Qemu::start(&agent.kernel, &agent.initrd).expect("start qemu");
        let c = AgentClient::connect(&q.socket, Duration::from_secs(10)).expect("connect");
        c.version_within(Duration::from_secs(60))
            .expect("agent answers");
        let a = q.started.elapsed();
        c.shutdown().expect("shutdown");
        q.wait_exit(Duration::from_secs(30)).expect("qemu exits");
        let t = q.started.elapsed();

        let started = Instant::now();
        let mut b = common::Qemu::start_with(&bare.kernel, &bare.initrd, "tandem_poweroff=1", &[])
            .expect("start qemu");
        b.wait_exit(Duration::from_secs(60))
            .expect("bare guest powers off");
        let bt = started.elapsed();
        println!("run {i}: agent answer {a:.2?}, agent boot+shutdown {t:.2?}, bare boot to init+poweroff {bt:.2?}");
        answer.push(a);
        total.push(t);
        bare_t.push(bt);
    }
    println!(
        "median of {runs}: agent answer {:.2?}, agent boot+shutdown {:.2?}, bare boot+poweroff {:.2?}",
        median(answer),
        median(total),
        median(bare_t)
    );
}
