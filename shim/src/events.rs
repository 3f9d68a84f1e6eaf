//! Task events to containerd, in order, over its ttrpc Events service (`TTRPC_ADDRESS`).
//! One task forwards them one at a time, reconnecting after a failure; at shutdown the queue is
//! drained (bounded) so that the last TaskDelete/TaskExit are not lost.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::{Client, EventsClient};
use containerd_shim::protos::ttrpc::context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// The type URL of each event, as containerd's typeurl registry names it. Constants rather than
/// protobuf reflection: reflection parses the descriptors of every proto file, which costs the
/// shim memory for nothing.
pub trait TypeName {
    const TYPE_URL: &'static str;
}

macro_rules! type_names {
    ($($t:ident),*) => { $(impl TypeName for $t { const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($t)); })* };
}
type_names!(
    TaskCreate,
    TaskStart,
    TaskExit,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskPaused,
    TaskResumed,
    TaskOOM
);

fn pack<E: Message + TypeName>(ev: &E) -> Option<Any> {
    Some(Any {
        type_url: E::TYPE_URL.to_string(),
        value: ev.write_to_bytes().ok()?,
        ..Default::default()
    })
}

struct Item {
    topic: String,
    event: Any,
    at: SystemTime,
}

/// The ordered event queue of the shim. Shared (`Arc`) by the service and its tasks; `close`
/// works through any handle, so the shim's exit never waits for the last clone to go.
pub struct Publisher {
    tx: Mutex<Option<mpsc::UnboundedSender<Item>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Publisher {
    pub fn start(ttrpc_address: String, namespace: String) -> Publisher {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(forward(ttrpc_address, namespace, rx));
        Publisher {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    pub fn publish<E: Event + Message + TypeName>(&self, ev: E) {
        let topic = ev.topic();
        let Some(event) = pack(&ev) else {
            tracing::warn!(topic, "could not encode event");
            return;
        };
        if let Some(tx) = &*self.tx.lock().expect("publisher poisoned") {
            let _ = tx.send(Item {
                topic,
                event,
                at: SystemTime::now(),
            });
        }
    }

    /// Stop taking events and give the queue up to `limit` to drain. Returns whether it
    /// drained in time.
    pub async fn close(&self, limit: Duration) -> bool {
        // dropping the only sender ends the forwarding task once the queue is empty
        self.tx.lock().expect("publisher poisoned").take();
        let task = self.task.lock().expect("publisher poisoned").take();
        match task {
            Some(t) => tokio::time::timeout(limit, t).await.is_ok(),
            None => true,
        }
    }
}

async fn connect(address: &str) -> Option<EventsClient> {
    let addr = if address.starts_with('/') {
        format!("unix://{address}")
    } else {
        address.to_string()
    };
    match Client::connect(&addr).await {
        Ok(c) => Some(EventsClient::new(c)),
        Err(e) => {
            tracing::warn!("connect to containerd events at {address}: {e}");
            None
        }
    }
}

async fn forward(address: String, namespace: String, mut rx: mpsc::UnboundedReceiver<Item>) {
    let mut client: Option<EventsClient> = None;
    while let Some(item) = rx.recv().await {
        let req = ForwardRequest {
            envelope: Some(Envelope {
                timestamp: Some(timestamp(item.at)).into(),
                namespace: namespace.clone(),
                topic: item.topic.clone(),
                event: Some(item.event).into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let mut sent = false;
        for attempt in 0..3u64 {
            if client.is_none() {
                client = connect(&address).await;
            }
            if let Some(c) = &client {
                match c
                    .forward(context::with_duration(Duration::from_secs(5)), &req)
                    .await
                {
                    Ok(_) => {
                        sent = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(topic = item.topic, "publish: {e}");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        if !sent {
            tracing::error!(topic = item.topic, "event dropped after 3 attempts");
        }
    }
}

// Constructors of the events, so that `service` reads as a list of what happens.

pub fn create(
    id: &str,
    bundle: &str,
    rootfs: Vec<containerd_shim::protos::types::mount::Mount>,
    io: TaskIO,
    pid: u32,
) -> TaskCreate {
    TaskCreate {
        container_id: id.to_string(),
        bundle: bundle.to_string(),
        rootfs,
        io: Some(io).into(),
        pid,
        ..Default::default()
    }
}

pub fn start(id: &str, pid: u32) -> TaskStart {
    TaskStart {
        container_id: id.to_string(),
        pid,
        ..Default::default()
    }
}

pub fn exit(id: &str, exec_id: &str, pid: u32, code: u32, at: SystemTime) -> TaskExit {
    TaskExit {
        container_id: id.to_string(),
        id: exec_id.to_string(),
        pid,
        exit_status: code,
        exited_at: Some(timestamp(at)).into(),
        ..Default::default()
    }
}

pub fn delete(id: &str, pid: u32, code: u32, at: SystemTime) -> TaskDelete {
    TaskDelete {
        container_id: id.to_string(),
        pid,
        exit_status: code,
        exited_at: Some(timestamp(at)).into(),
        ..Default::default()
    }
}

pub fn exec_added(id: &str, exec_id: &str) -> TaskExecAdded {
    TaskExecAdded {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

pub fn exec_started(id: &str, exec_id: &str, pid: u32) -> TaskExecStarted {
    TaskExecStarted {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        pid,
        ..Default::default()
    }
}

pub fn paused(id: &str) -> TaskPaused {
    TaskPaused {
        container_id: id.to_string(),
        ..Default::default()
    }
}

pub fn resumed(id: &str) -> TaskResumed {
    TaskResumed {
        container_id: id.to_string(),
        ..Default::default()
    }
}

pub fn oom(id: &str) -> TaskOOM {
    TaskOOM {
        container_id: id.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::MessageFull;

    fn same<E: MessageFull + TypeName>() {
        assert_eq!(E::TYPE_URL, E::descriptor().full_name());
    }

    #[test]
    fn type_urls_match_the_protos() {
        same::<TaskCreate>();
        same::<TaskStart>();
        same::<TaskExit>();
        same::<TaskDelete>();
        same::<TaskExecAdded>();
        same::<TaskExecStarted>();
        same::<TaskPaused>();
        same::<TaskResumed>();
        same::<TaskOOM>();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn close_through_a_shared_handle_drains_and_stops_taking_events() {
        // A real ttrpc Events server on a socket: the queued event must reach it before close
        // returns, although other handles of the publisher are still alive.
        use containerd_shim::protos::shim_async::{create_events, Events};
        use containerd_shim::protos::ttrpc::r#async::{Server, TtrpcContext};
        use std::sync::Arc;

        struct Sink(mpsc::UnboundedSender<String>);
        #[async_trait::async_trait]
        impl Events for Sink {
            async fn forward(
                &self,
                _ctx: &TtrpcContext,
                req: ForwardRequest,
            ) -> containerd_shim::protos::ttrpc::Result<
                containerd_shim::protos::protobuf::well_known_types::empty::Empty,
            > {
                let _ = self.0.send(req.envelope.topic.clone());
                Ok(Default::default())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = format!("unix://{}/ev.sock", dir.path().display());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut server = Server::new()
            .bind(&sock)
            .unwrap()
            .register_service(create_events(Arc::new(Sink(tx))));
        server.start().await.unwrap();

        let p = Arc::new(Publisher::start(sock, "ns".into()));
        let other = p.clone();
        p.publish(delete("c1", 7, 0, SystemTime::now()));
        assert!(p.close(Duration::from_secs(5)).await, "queue drained");
        assert_eq!(rx.try_recv().unwrap(), "/tasks/delete");
        // closed: later events are not taken, and a second close returns at once
        other.publish(paused("c1"));
        assert!(other.close(Duration::from_millis(1)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing after close");
        let _ = server.shutdown().await;
    }

    #[test]
    fn exit_event_carries_code_and_time() {
        let at = UNIX_EPOCH + Duration::from_millis(1500);
        let e = exit("c1", "c1", 42, 137, at);
        let any = pack(&e).unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let back = TaskExit::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.exit_status, 137);
        assert_eq!(back.pid, 42);
        assert_eq!(back.exited_at.seconds, 1);
        assert_eq!(back.exited_at.nanos, 500_000_000);
    }
}
