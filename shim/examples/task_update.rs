//! Dev tool: call Task.Update on a running shim (ctr 1.6 has no `task update`).
//!
//!   task_update <shim-address> <container-id> '<LinuxResources JSON>'
//!
//! The address is in the bundle's `address` file.

use containerd_shim::protos::api::UpdateTaskRequest;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim_async::{Client, TaskClient};
use containerd_shim::protos::ttrpc::context;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 4, "usage: task_update ADDRESS ID RESOURCES_JSON");
    let client = TaskClient::new(Client::connect(&a[1]).await?);
    let req = UpdateTaskRequest {
        id: a[2].clone(),
        resources: Some(Any {
            type_url: "opencontainers/runtime-spec/1/LinuxResources".into(),
            value: a[3].as_bytes().to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    client
        .update(context::with_timeout(5_000_000_000), &req)
        .await?;
    println!("updated {}", a[2]);
    Ok(())
}
