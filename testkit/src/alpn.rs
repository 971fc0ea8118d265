//! A TLS listener on 127.0.0.1 that reads each client's ClientHello, records the ALPN
//! protocol names it offers, and hangs up (no certificate needed): for testing what a
//! client offers (`tls_alpn`). Std threads; stops when dropped.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The listener; `offers()` lists what each connection offered, in order.
#[derive(Debug)]
pub struct AlpnProbe {
    /// Where clients connect.
    pub port: u16,
    offers: Arc<(Mutex<Vec<Vec<String>>>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl AlpnProbe {
    /// Starts listening.
    pub fn start() -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let offers = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (offers.clone(), stop.clone());
        std::thread::Builder::new()
            .name("alpn-probe".into())
            .spawn(move || {
                // Drop wakes the accept with a connection of its own.
                for tcp in listener.incoming() {
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut tcp) = tcp else { continue };
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut acceptor = rustls::server::Acceptor::default();
                    while Instant::now() < deadline {
                        if acceptor.read_tls(&mut tcp).unwrap_or(0) == 0 {
                            break;
                        }
                        match acceptor.accept() {
                            Ok(None) => continue,
                            Ok(Some(accepted)) => {
                                let offered = accepted
                                    .client_hello()
                                    .alpn()
                                    .map(|it| {
                                        it.map(|p| String::from_utf8_lossy(p).into_owned())
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                if let Ok(mut s) = seen.0.lock() {
                                    s.push(offered);
                                    seen.1.notify_all();
                                }
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(Self { port, offers, stop })
    }

    /// What each connection offered so far.
    pub fn offers(&self) -> Vec<Vec<String>> {
        self.offers.0.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Until a connection's offer arrived (at most `timeout`): the first.
    pub fn wait_first(&self, timeout: Duration) -> Option<Vec<String>> {
        let (lock, cvar) = &*self.offers;
        let guard = lock.lock().ok()?;
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |o| o.is_empty())
            .ok()?;
        guard.first().cloned()
    }
}

impl Drop for AlpnProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
