//! A blocking CRI client over containerd's socket: the calls kubelet makes, with its defaults.
//!
//! Uses the `k8s-cri` crate's generated v1 API (tonic) on a current-thread tokio runtime, so that
//! tests stay plain synchronous code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

/// One connection to containerd's CRI plugin.
pub struct Cri {
    /// Cgroup parents of the pods run through this client (kubelet's part: removed by
    /// [`CriEnv`] when the test ends).
    pub cgroup_parents: Vec<String>,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// What a test pod asks for, on top of kubelet's defaults.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub handler: String,
    pub log_dir: PathBuf,
    pub cgroup_parent: String,
    pub annotations: HashMap<String, String>,
}

/// What a test container asks for.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub cpuset_cpus: String,
    pub memory_limit: i64,
    pub annotations: HashMap<String, String>,
    /// Capabilities added to the runtime's default set (e.g. "NET_ADMIN").
    pub add_capabilities: Vec<String>,
    /// Volumes as kubelet passes them (an emptyDir or hostPath directory): host path,
    /// container path, read-only.
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// CPU limit as kubelet passes `limits: cpu` (quota/period in µs; 0: none).
    pub cpu_quota: i64,
    pub cpu_period: i64,
    /// The pod's PID namespace (kubelet's `shareProcessNamespace: true`: namespace_options.pid
    /// = POD) instead of one of its own.
    pub share_pid: bool,
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime for the CRI client")?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]")?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .with_context(|| format!("connect to CRI at {}", socket.display()))?;
        Ok(Self {
            cgroup_parents: Vec::new(),
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(
            &mut RuntimeServiceClient<Channel>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + '_>,
        >,
    ) -> Result<T> {
        let fut = f(&mut self.runtime);
        let resp = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), fut).await })
            .map_err(|_| anyhow::anyhow!("CRI {what}: no answer within 60 s"))?
            .map_err(|s| anyhow::anyhow!("CRI {what}: {}: {}", s.code(), s.message()))?;
        Ok(resp.into_inner())
    }

    /// Waits until the CRI plugin answers: containerd serves its socket before the plugin has
    /// recovered its pods and containers (after a restart), and until then every CRI call fails
    /// with "server is not initialized yet"; kubelet retries the same way.
    pub fn wait_initialized(&mut self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.list_pods() {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(e.context("the CRI plugin not initialized within 30 s"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn version(&mut self) -> Result<VersionResponse> {
        self.call("Version", |c| {
            Box::pin(c.version(VersionRequest {
                version: "v1".into(),
            }))
        })
    }

    pub fn image_status(&mut self, image: &str) -> Result<Option<Image>> {
        let req = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let fut = self.images.image_status(req);
        let resp = self
            .rt
            .block_on(fut)
            .map_err(|s| anyhow::anyhow!("CRI ImageStatus {image}: {}", s.message()))?;
        Ok(resp.into_inner().image)
    }

    pub fn pod_config(spec: &PodSpec) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: format!("uid-{}", spec.name),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: spec.name.clone(),
            log_directory: spec.log_dir.display().to_string(),
            annotations: spec.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: spec.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox; returns the sandbox id and the config to pass to CreateContainer.
    pub fn run_pod(&mut self, spec: &PodSpec) -> Result<(String, PodSandboxConfig)> {
        let config = Self::pod_config(spec);
        if !spec.cgroup_parent.is_empty() {
            self.cgroup_parents.push(spec.cgroup_parent.clone());
        }
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: spec.handler.clone(),
        };
        let id = self
            .call("RunPodSandbox", |c| Box::pin(c.run_pod_sandbox(req)))?
            .pod_sandbox_id;
        Ok((id, config))
    }

    /// RunPodSandbox with a config the test changed (e.g. `dns_config`) from
    /// [`Cri::pod_config`]`(spec)`; returns the sandbox id.
    pub fn run_pod_with_config(
        &mut self,
        spec: &PodSpec,
        config: PodSandboxConfig,
    ) -> Result<String> {
        if !spec.cgroup_parent.is_empty() {
            self.cgroup_parents.push(spec.cgroup_parent.clone());
        }
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: spec.handler.clone(),
        };
        Ok(self
            .call("RunPodSandbox", |c| Box::pin(c.run_pod_sandbox(req)))?
            .pod_sandbox_id)
    }

    pub fn pod_status(&mut self, id: &str) -> Result<PodSandboxStatus> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        self.call("PodSandboxStatus", |c| Box::pin(c.pod_sandbox_status(req)))?
            .status
            .context("PodSandboxStatus without status")
    }

    pub fn create_container(
        &mut self,
        pod_id: &str,
        pod_config: &PodSandboxConfig,
        spec: &ContainerSpec,
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            mounts: spec
                .mounts
                .iter()
                .map(|(host, ctr, ro)| Mount {
                    container_path: ctr.clone(),
                    host_path: host.display().to_string(),
                    readonly: *ro,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", spec.name),
            annotations: spec.annotations.clone(),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    cpu_shares: 2,
                    cpuset_cpus: spec.cpuset_cpus.clone(),
                    memory_limit_in_bytes: spec.memory_limit,
                    cpu_quota: spec.cpu_quota,
                    cpu_period: spec.cpu_period,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: if spec.share_pid {
                            NamespaceMode::Pod as i32
                        } else {
                            NamespaceMode::Container as i32
                        },
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    capabilities: (!spec.add_capabilities.is_empty()).then(|| Capability {
                        add_capabilities: spec.add_capabilities.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .call("CreateContainer", |c| Box::pin(c.create_container(req)))?
            .container_id)
    }

    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        self.call("StartContainer", |c| Box::pin(c.start_container(req)))?;
        Ok(())
    }

    pub fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 30,
        };
        self.call("ExecSync", |c| Box::pin(c.exec_sync(req)))
    }

    pub fn container_status(&mut self, id: &str) -> Result<ContainerStatus> {
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.call("ContainerStatus", |c| Box::pin(c.container_status(req)))?
            .status
            .context("ContainerStatus without status")
    }

    pub fn list_containers(&mut self, pod_id: &str) -> Result<Vec<Container>> {
        let req = ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod_id.into(),
                ..Default::default()
            }),
        };
        Ok(self
            .call("ListContainers", |c| Box::pin(c.list_containers(req)))?
            .containers)
    }

    pub fn list_pods(&mut self) -> Result<Vec<PodSandbox>> {
        let req = ListPodSandboxRequest { filter: None };
        Ok(self
            .call("ListPodSandbox", |c| Box::pin(c.list_pod_sandbox(req)))?
            .items)
    }

    pub fn container_stats(&mut self, id: &str) -> Result<ContainerStats> {
        let req = ContainerStatsRequest {
            container_id: id.into(),
        };
        self.call("ContainerStats", |c| Box::pin(c.container_stats(req)))?
            .stats
            .context("ContainerStats without stats")
    }

    pub fn update_resources(&mut self, id: &str, res: LinuxContainerResources) -> Result<()> {
        let req = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(res),
            ..Default::default()
        };
        self.call("UpdateContainerResources", |c| {
            Box::pin(c.update_container_resources(req))
        })?;
        Ok(())
    }

    pub fn stop_container(&mut self, id: &str, timeout: i64) -> Result<()> {
        let req = StopContainerRequest {
            container_id: id.into(),
            timeout,
        };
        self.call("StopContainer", |c| Box::pin(c.stop_container(req)))?;
        Ok(())
    }

    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", |c| Box::pin(c.remove_container(req)))?;
        Ok(())
    }

    pub fn stop_pod(&mut self, id: &str) -> Result<()> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("StopPodSandbox", |c| Box::pin(c.stop_pod_sandbox(req)))?;
        Ok(())
    }

    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("RemovePodSandbox", |c| Box::pin(c.remove_pod_sandbox(req)))?;
        Ok(())
    }

    /// Stop and remove a pod with all its containers; errors are collected, not short-circuited.
    pub fn teardown_pod(&mut self, id: &str) -> Result<()> {
        let stop = self.stop_pod(id);
        let remove = self.remove_pod(id);
        stop.and(remove)
    }
}

/// A private containerd with the CRI plugin, CNI (bridge + host-local on a 198.18.x.0/24 of its
/// own), tandem's pause and busybox images in `k8s.io`, and the runtime handlers `tandem`
/// (`ConfigPath` = a tandem.toml written by the test) and `runc`. Drop stops containerd (the
/// harness cleans up) and removes the CNI bridge and IPAM state.
pub struct CriEnv {
    // Drop order matters: the client, then containerd (pods stopped), then the network.
    pub cri: Cri,
    pub containerd: crate::Containerd,
    pub net: CniNet,
    /// The tandem config file the `tandem` handler points at.
    pub tandem_config: PathBuf,
    /// The config file of the `tandem-vm` handler, when the env has one.
    pub tandem_vm_config: Option<PathBuf>,
}

/// The CNI bridge and IPAM state of one [`CriEnv`], removed on drop.
pub struct CniNet {
    pub bridge: String,
    pub subnet: String,
    dir: Option<tempfile::TempDir>,
}

impl CniNet {
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir until drop").path()
    }
}

impl Drop for CniNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

static SUBNET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl CriEnv {
    /// `tandem_toml`: contents of the `tandem` handler's config file.
    pub fn start(tandem_toml: &str) -> Result<Self> {
        Self::start_with_vm(tandem_toml, None)
    }

    /// As [`CriEnv::start`], and with `vm_toml` a second handler `tandem-vm` (the name
    /// deploy/containerd/tandem.toml gives it) whose config file has those contents.
    pub fn start_with_vm(tandem_toml: &str, vm_toml: Option<&str>) -> Result<Self> {
        // A /24 of 198.18.0.0/15 per env: pid and a counter keep parallel tests apart.
        let n = SUBNET.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let third = (std::process::id() as u8)
            .wrapping_mul(16)
            .wrapping_add(n % 16);
        let subnet = format!("198.19.{third}.0/24");
        let bridge = format!("tdm{}x{n}", std::process::id() % 100000);
        let net = CniNet {
            bridge: bridge.clone(),
            subnet: subnet.clone(),
            dir: Some(
                tempfile::Builder::new()
                    .prefix("tandem-cni-")
                    .tempdir_in("/tmp")?,
            ),
        };
        let dir = net.dir().to_path_buf();
        let cni_dir = dir.join("cni");
        std::fs::create_dir_all(&cni_dir)?;
        std::fs::write(
            cni_dir.join("10-tandem.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("tandem-{bridge}"),
                "plugins": [
                    {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "routes": [{"dst": "0.0.0.0/0"}],
                              "dataDir": dir.join("ipam")}},
                    {"type": "loopback"}
                ]
            })
            .to_string(),
        )?;
        let tandem_config = dir.join("tandem.toml");
        std::fs::write(&tandem_config, tandem_toml)?;
        let mut tandem_vm_config = None;
        let mut vm_handler = String::new();
        if let Some(vm_toml) = vm_toml {
            let path = dir.join("tandem-vm.toml");
            std::fs::write(&path, vm_toml)?;
            vm_handler = format!(
                r#"    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.tandem-vm]
      runtime_type = "io.containerd.tandem.v2"
      pod_annotations = ["io.tandem.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.tandem-vm.options]
        ConfigPath = "{}"
"#,
                path.display()
            );
            tandem_vm_config = Some(path);
        }
        let cri_toml = format!(
            r#"  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.tandem]
      runtime_type = "io.containerd.tandem.v2"
      pod_annotations = ["io.tandem.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.tandem.options]
        ConfigPath = "{cfg}"
{vm_handler}"#,
            pause = crate::PAUSE,
            cni = cni_dir.display(),
            cfg = tandem_config.display(),
        );
        let containerd = crate::Containerd::builder().cri(&cri_toml).start()?;
        for tar in [crate::pause_tar(), crate::busybox_tar()] {
            let o = Command::new("ctr")
                .arg("-a")
                .arg(&containerd.socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(&tar)
                .output()?;
            anyhow::ensure!(
                o.status.success(),
                "import {}: {}",
                tar.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let mut cri = Cri::connect(&containerd.socket)?;
        cri.wait_initialized()?;
        Ok(Self {
            cri,
            containerd,
            net,
            tandem_config,
            tandem_vm_config,
        })
    }
}

impl CriEnv {
    /// Restarts containerd (see [`crate::Containerd::restart`]) and reconnects the client.
    pub fn restart_containerd(&mut self) -> Result<()> {
        self.containerd.restart()?;
        let parents = std::mem::take(&mut self.cri.cgroup_parents);
        self.cri = Cri::connect(&self.containerd.socket)?;
        self.cri.cgroup_parents = parents;
        self.cri.wait_initialized()
    }
}

impl Drop for CriEnv {
    /// What kubelet would do at the end of every pod, also when a test failed half-way: stop and
    /// remove every pod (containers, netns, shims go with them), then remove the pod cgroups.
    fn drop(&mut self) {
        if let Ok(pods) = self.cri.list_pods() {
            for p in pods {
                let _ = self.cri.teardown_pod(&p.id);
            }
        }
        for parent in &self.cri.cgroup_parents {
            for h in crate::cgroup_hierarchies() {
                let dir = h.join(parent.trim_start_matches('/'));
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten().filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}
