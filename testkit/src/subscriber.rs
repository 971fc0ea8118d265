//! An independent MQTT 5 (or 3.1.1, for brokers without 5) subscriber (rumqttc) that
//! records everything it receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::Notify;

/// One message as the subscriber saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// The retain flag as delivered.
    pub retain: bool,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
}

/// The client of either protocol version.
#[derive(Debug)]
enum Client {
    V5(AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// A subscriber to `filter` on a broker at 127.0.0.1:`port`, recording arrivals.
#[derive(Debug)]
pub struct Subscriber {
    messages: Arc<Mutex<Vec<Message>>>,
    notify: Arc<Notify>,
    client: Client,
    task: tokio::task::JoinHandle<()>,
    subacks: Arc<std::sync::atomic::AtomicUsize>,
}

impl Subscriber {
    /// Connects, subscribes at QoS 2 and returns once the SUBACK arrived (at most 10 s).
    pub async fn start(port: u16, filter: &str) -> Result<Self, String> {
        Self::start_at("127.0.0.1", port, filter).await
    }

    /// [`Subscriber::start`] on `host:port`. After a reconnect to a broker that has no
    /// session for it (a restarted broker), it subscribes again; [`Subscriber::subacks`]
    /// counts the SUBACKs.
    pub async fn start_at(host: &str, port: u16, filter: &str) -> Result<Self, String> {
        // Unique per subscriber: two clients with one id evict each other.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("checker-{}-{port}-{n}", std::process::id());
        let mut opts = MqttOptions::new(id, host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(Some(64 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        client
            .subscribe(filter, QoS::ExactlyOnce)
            .await
            .map_err(|e| format!("subscribe {filter}: {e}"))?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let subscribed = Arc::new(Notify::new());
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (m, n, s, count) = (
            messages.clone(),
            notify.clone(),
            subscribed.clone(),
            subacks.clone(),
        );
        let (again, filter_again) = (client.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            let mut connacks = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        s.notify_one();
                        n.notify_waiters();
                    }
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        connacks += 1;
                        if connacks > 1 && !c.session_present {
                            let _ = again.try_subscribe(filter_again.clone(), QoS::ExactlyOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let msg = Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            retain: p.retain,
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                        };
                        m.lock().expect("lock").push(msg);
                        n.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .map_err(|_| format!("no SUBACK for {filter} within 10 s"))?;
        Ok(Self {
            messages,
            notify,
            client: Client::V5(client),
            task,
            subacks,
        })
    }

    /// [`Subscriber::start_at`] speaking MQTT 3.1.1 (QoS 2 subscription; no properties
    /// recorded), for brokers without MQTT 5.
    pub async fn start_v311_at(host: &str, port: u16, filter: &str) -> Result<Self, String> {
        use rumqttc::{Event, Packet, QoS};
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("checker4-{}-{port}-{n}", std::process::id());
        let mut opts = rumqttc::MqttOptions::new(id, host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1024);
        client
            .subscribe(filter, QoS::ExactlyOnce)
            .await
            .map_err(|e| format!("subscribe {filter}: {e}"))?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let subscribed = Arc::new(Notify::new());
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (m, n, s, count) = (
            messages.clone(),
            notify.clone(),
            subscribed.clone(),
            subacks.clone(),
        );
        let (again, filter_again) = (client.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            let mut connacks = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        s.notify_one();
                        n.notify_waiters();
                    }
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        connacks += 1;
                        if connacks > 1 && !c.session_present {
                            let _ = again.try_subscribe(filter_again.clone(), QoS::ExactlyOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Message {
                            topic: p.topic,
                            payload: p.payload,
                            retain: p.retain,
                            user_properties: Vec::new(),
                            content_type: None,
                        };
                        m.lock().expect("lock").push(msg);
                        n.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .map_err(|_| format!("no SUBACK for {filter} within 10 s"))?;
        Ok(Self {
            messages,
            notify,
            client: Client::V311(client),
            task,
            subacks,
        })
    }

    /// SUBACKs received (1 after start; one more per subscription after a reconnect).
    pub fn subacks(&self) -> usize {
        self.subacks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` SUBACKs arrived, at most `timeout`; returns the count.
    pub async fn wait_for_subacks(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.subacks() >= n || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.subacks();
            }
        }
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages arrived, at most `timeout`; returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let count = self.messages.lock().expect("lock").len();
            if count >= n {
                return count;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages.lock().expect("lock").len();
            }
        }
    }

    /// Waits until every payload in `want` arrived (at least once), at most `timeout`;
    /// returns how many of them arrived.
    pub async fn wait_for_all(&self, want: &[Bytes], timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        // Incremental: each wake looks only at the messages that arrived since the last.
        let mut missing: std::collections::BTreeSet<&Bytes> = want.iter().collect();
        let mut read = 0;
        loop {
            let notified = self.notify.notified();
            {
                let msgs = self.messages.lock().expect("lock");
                for m in &msgs[read..] {
                    missing.remove(&m.payload);
                }
                read = msgs.len();
            }
            if missing.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return want.len() - missing.len();
            }
        }
    }

    /// Disconnects.
    pub async fn stop(self) {
        let _ = match &self.client {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
        self.task.abort();
    }
}

/// [`Subscriber`] for synchronous tests: it runs on its own tokio runtime.
#[derive(Debug)]
pub struct SyncSubscriber {
    rt: tokio::runtime::Runtime,
    inner: Option<Subscriber>,
}

impl SyncSubscriber {
    /// Connects and subscribes (panics with the reason if it cannot: a test fixture).
    pub fn start(port: u16, filter: &str) -> Self {
        Self::start_at("127.0.0.1", port, filter)
    }

    /// [`SyncSubscriber::start`] on `host:port` (see [`Subscriber::start_at`]).
    pub fn start_at(host: &str, port: u16, filter: &str) -> Self {
        Self::start_with(|| Subscriber::start_at(host, port, filter))
    }

    /// [`SyncSubscriber::start`] speaking MQTT 3.1.1 (see [`Subscriber::start_v311_at`]).
    pub fn start_v311(port: u16, filter: &str) -> Self {
        Self::start_with(|| Subscriber::start_v311_at("127.0.0.1", port, filter))
    }

    fn start_with<F>(start: impl FnOnce() -> F) -> Self
    where
        F: std::future::Future<Output = Result<Subscriber, String>>,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let inner = rt
            .block_on(start())
            .unwrap_or_else(|e| panic!("subscriber: {e}"));
        Self {
            rt,
            inner: Some(inner),
        }
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Message> {
        self.inner
            .as_ref()
            .map(Subscriber::messages)
            .unwrap_or_default()
    }

    /// Waits until at least `n` messages arrived, at most `timeout`; returns the count.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        match &self.inner {
            Some(s) => self.rt.block_on(s.wait_for(n, timeout)),
            None => 0,
        }
    }
}

impl SyncSubscriber {
    /// Waits until at least `n` SUBACKs arrived (see [`Subscriber::wait_for_subacks`]).
    pub fn wait_for_subacks(&self, n: usize, timeout: Duration) -> usize {
        match &self.inner {
            Some(s) => self.rt.block_on(s.wait_for_subacks(n, timeout)),
            None => 0,
        }
    }

    /// Waits until every payload in `want` arrived (at least once), at most `timeout`;
    /// returns how many of them arrived.
    pub fn wait_for_all(&self, want: &[Bytes], timeout: Duration) -> usize {
        match &self.inner {
            Some(s) => self.rt.block_on(s.wait_for_all(want, timeout)),
            None => 0,
        }
    }
}

impl Drop for SyncSubscriber {
    fn drop(&mut self) {
        if let Some(s) = self.inner.take() {
            self.rt.block_on(s.stop());
        }
    }
}
