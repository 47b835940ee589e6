//! Keep-alive HTTP/1.1 connections to one upstream URL (over TLS for `https://` URLs): the
//! transport under [`Upstreams::send`](super::Upstreams::send) for `protocol = "http1"`
//! services (HTTP/2 services multiplex on hyper-util's client instead).
//!
//! Each connection runs in its own task (hyper's `client::conn::http1`), like hyper-util's
//! client; what differs is the pool. hyper-util keys one pool for all hosts by scheme and
//! authority (hashed on every checkout and check-in), races every checkout against a lazy new
//! connection and clones the URI twice. Here each URL owns its idle list: a request pops the
//! most recently used idle connection (LIFO, so surplus connections age out), or connects.
//! `benches/callgrind.sh` counted 59,414 instructions per proxied request with hyper-util's
//! client and 48,402 with this pool (docs/dev/0002).
//!
//! A request that finds its pooled connection closed before anything was written is resent on
//! another connection (the upstream never saw it). Idle connections are closed after the idle
//! timeout by a reaper task, and are never reused past it, so we rarely write to a socket the
//! upstream is closing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::tls::Connector;
use crate::body::Body;

/// How often idle connections past the idle timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// The host name did not resolve.
    #[error("cannot resolve `{target}`")]
    Resolve {
        target: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    /// No TCP connection within the connect timeout.
    #[error("connecting to `{target}` timed out after {timeout:?}")]
    ConnectTimeout { target: Arc<str>, timeout: Duration },
    /// Every address refused or was unreachable.
    #[error("cannot connect to `{target}`")]
    Connect {
        target: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (or did not finish within the connect timeout).
    #[error("TLS handshake with `{target}` failed")]
    Tls {
        target: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    /// The request or response broke on an established connection.
    #[error("exchange with `{target}` failed")]
    Exchange {
        target: Arc<str>,
        #[source]
        source: hyper::Error,
    },
}

impl PoolError {
    /// True when no connection was made, so the upstream cannot have seen the request.
    pub(crate) fn is_connect(&self) -> bool {
        !matches!(self, Self::Exchange { .. })
    }
}

/// Idle connections to one upstream URL, and how to make new ones.
#[derive(Debug)]
pub(crate) struct Pool {
    /// `host:port` to resolve and connect to.
    target: Arc<str>,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// Set for `https://` URLs.
    tls: Option<Connector>,
    reaper: Once,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    pub(crate) fn new(
        target: Arc<str>,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        tls: Option<Connector>,
    ) -> Arc<Self> {
        Arc::new(Self {
            target,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
            tls,
            reaper: Once::new(),
        })
    }

    /// Sends `req` (origin-form URI, `host` set) on an idle connection or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, PoolError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.recycle(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection closed before the request was written: the
                    // upstream saw nothing, so another connection may carry it. Each retry
                    // used up an idle connection, so this ends.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        return Err(PoolError::Exchange {
                            target: self.target.clone(),
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and within the idle timeout.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(Idle { sender, since }) = idle.pop() {
            if sender.is_ready() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
            // Dropped: closed by the upstream, or idle so long it may be closing it now.
        }
        None
    }

    /// Puts the connection back once its response has been read off the wire; right away when
    /// it already was (a whole small response in one read), otherwise from a task that waits.
    fn recycle(self: &Arc<Self>, mut sender: SendRequest<Body>) {
        if self.max_idle == 0 {
            return;
        }
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put(sender);
                }
            });
        }
    }

    fn put(self: &Arc<Self>, sender: SendRequest<Body>) {
        self.reaper.call_once(|| spawn_reaper(Arc::downgrade(self)));
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        // Otherwise dropped here, which closes the connection.
    }

    /// Closes idle connections past the idle timeout or already closed by the upstream.
    fn reap(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|i| !i.sender.is_closed() && now - i.since < self.idle_timeout);
    }

    /// A new connection, its task spawned. Resolving and connecting share the connect timeout;
    /// with several addresses each gets an equal share of it, so one that drops packets cannot
    /// use it all.
    async fn connect(&self) -> Result<SendRequest<Body>, PoolError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.connect_timeout;
        let timed_out = || PoolError::ConnectTimeout {
            target: self.target.clone(),
            timeout: self.connect_timeout,
        };
        let addrs: Vec<SocketAddr> =
            tokio::time::timeout_at(deadline, tokio::net::lookup_host(&*self.target))
                .await
                .map_err(|_| timed_out())?
                .map_err(|source| PoolError::Resolve {
                    target: self.target.clone(),
                    source,
                })?
                .collect();
        let share = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .checked_div(u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX))
            .unwrap_or_default();
        let mut last_error = None;
        let mut stream = None;
        for addr in addrs {
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => {}
            }
        }
        let stream = match (stream, last_error) {
            (Some(s), _) => s,
            (None, Some(source)) => {
                return Err(PoolError::Connect {
                    target: self.target.clone(),
                    source,
                });
            }
            (None, None) => return Err(timed_out()),
        };
        // Requests are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => self.handshake(TokioIo::new(stream)).await,
            Some(tls) => {
                // The handshake shares the connect timeout.
                let stream = tokio::time::timeout_at(deadline, tls.connect(stream))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|source| PoolError::Tls {
                        target: self.target.clone(),
                        source,
                    })?;
                self.handshake(TokioIo::new(stream)).await
            }
        }
    }

    /// HTTP/1.1 on a connected stream; the connection's task is spawned.
    async fn handshake<I>(&self, io: I) -> Result<SendRequest<Body>, PoolError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) =
            Builder::new()
                .handshake(io)
                .await
                .map_err(|source| PoolError::Exchange {
                    target: self.target.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }
}

/// Reaps the pool every [`REAP_EVERY`] until the pool is gone (its snapshot was replaced and
/// the last request on it finished).
fn spawn_reaper(pool: Weak<Pool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match pool.upgrade() {
                Some(pool) => pool.reap(),
                None => break,
            }
        }
    });
}
