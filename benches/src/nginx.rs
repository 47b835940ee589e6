//! nginx as the reference reverse proxy: one worker, keep-alive to the same upstream, no access
//! log. Runs as a child process from a config written to a private temp directory, and is
//! killed when the guard is dropped (also on error or panic).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How to install nginx when it is missing (Debian/Ubuntu).
pub const INSTALL_HINT: &str = "apt-get install -y nginx";

/// The nginx binary: `$NGINX` if set, else `nginx` on `PATH`, else the Debian location.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(p));
    }
    crate::which("nginx").or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    })
}

/// The header work bff-proxy does on every request with its default `[headers]` settings
/// (request id generated, sent upstream and echoed; client name; `x-forwarded-*` and
/// `forwarded`), written as nginx directives so both proxies do the same job.
const SAME_HEADERS: &str = r#"
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\"$host\"";
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Bff-Client web;
            add_header X-Request-Id $request_id always;"#;

/// The config: `workers` worker processes (with one worker, no master process, so killing the
/// child stops everything), keep-alive to the upstream with a pool of `pool` idle connections,
/// keep-alive with clients without a per-connection request cap. With `same_headers`, nginx
/// also does bff-proxy's per-request header work ([`SAME_HEADERS`]); without, it is a bare
/// pass-through. With `access_log`, it logs every request (the default `combined` format) to
/// `access.log` in `dir`; without, no access log.
pub fn config(
    dir: &Path,
    listen_port: u16,
    upstream: SocketAddr,
    pool: usize,
    workers: usize,
    same_headers: bool,
    access_log: bool,
) -> String {
    let d = dir.display();
    let access_log = if access_log {
        format!("{d}/access.log")
    } else {
        "off".to_owned()
    };
    let headers = if same_headers { SAME_HEADERS } else { "" };
    let master = if workers <= 1 { "off" } else { "on" };
    let workers = workers.max(1);
    format!(
        r#"worker_processes {workers};
master_process {master};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log {access_log};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream bench_upstream {{
        server {upstream};
        keepalive {pool};
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{headers}
        }}
    }}
}}
"#
    )
}

/// A running nginx. Dropping it kills the process and removes its temp directory.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    binary: PathBuf,
    conf: PathBuf,
    addr: SocketAddr,
    dir: PathBuf,
    version: String,
}

impl Nginx {
    /// Starts `binary` with `workers` worker processes in front of `upstream` and waits (up to
    /// 10 s) until it answers. See [`config`] for `same_headers`; `pin` is a `taskset -c` CPU
    /// list.
    pub fn start(
        binary: &Path,
        upstream: SocketAddr,
        pool: usize,
        workers: usize,
        same_headers: bool,
        access_log: bool,
        pin: Option<&str>,
    ) -> anyhow::Result<Self> {
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "bff-bench-nginx-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = crate::free_port().context("finding a port for nginx")?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            config(
                &dir,
                port,
                upstream,
                pool,
                workers,
                same_headers,
                access_log,
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = crate::pin::command(binary, pin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut nginx = Self {
            child,
            binary: binary.to_owned(),
            conf,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            version,
        };
        nginx.wait_ready(Duration::from_secs(10))?;
        Ok(nginx)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Process id (with one worker and no master, the process that does the work).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What `nginx -v` printed.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                let err = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited at startup ({status}): {log}{err}");
            }
            if crate::http_get_ok(self.addr, "/bench", Duration::from_millis(500)) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("nginx did not answer on {} within {limit:?}", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // With a master process, ask it to stop its workers (SIGTERM via the pid file) first;
        // a SIGKILLed master would leave them running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new(&self.binary)
                .arg("-p")
                .arg(&self.dir)
                .arg("-e")
                .arg(self.dir.join("error.log"))
                .arg("-c")
                .arg(&self.conf)
                .args(["-s", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3)
                && matches!(self.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
