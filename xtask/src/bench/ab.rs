//! Request/response (TCP, or UDP on a connected socket) measured A/B
//! within one process: one connection per mode, each made from that
//! mode's cgroup and network namespace (a socket keeps both for life, and
//! the cgroup hooks act on the socket's cgroup), then short batches of
//! transactions on each in turn. Modes a few milliseconds apart share the
//! machine's state — a VM's neighbours, the CPU's clock — which separate
//! runs seconds apart do not: there a run scatters by ±10%, more than the
//! few percent being measured.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::json;

use super::{stats::median, world};

/// Bytes per request and per response, as sockperf's `-m 64`.
pub const MSG: usize = 64;
/// Transactions per batch: a few milliseconds, short against the
/// machine's drifts and long against the switch between connections.
const BATCH: usize = 200;

/// Helper: echoes `MSG`-byte messages on every TCP connection (one
/// thread each) and every UDP datagram to `PORT`. Exits after the given
/// number of seconds at the latest.
pub fn server(args: &[String]) -> Result<()> {
    let port = world::server_args(args)?;
    let l = TcpListener::bind(("0.0.0.0", port))?;
    let u = UdpSocket::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        let mut b = [0u8; MSG];
        while let Ok((n, from)) = u.recv_from(&mut b) {
            let _ = u.send_to(&b[..n], from);
        }
    });
    println!("listening");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut b = [0u8; MSG];
            while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
        });
    }
    Ok(())
}

/// One mode's connection: a TCP stream or a connected UDP socket.
enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Conn {
    /// `n` request/responses; returns the seconds they took.
    fn batch(&mut self, n: usize) -> Result<f64> {
        let mut b = [0u8; MSG];
        let start = Instant::now();
        for _ in 0..n {
            match self {
                Conn::Tcp(s) => {
                    s.write_all(&b)?;
                    s.read_exact(&mut b)?;
                }
                Conn::Udp(s) => {
                    s.send(&b)?;
                    // Nothing drops datagrams on a quiet veth; a lost one
                    // is an error (read timeout), not a hang.
                    if s.recv(&mut b)? != MSG {
                        bail!("short datagram");
                    }
                }
            }
        }
        Ok(start.elapsed().as_secs_f64())
    }
}

/// Enters `cgroup` and the network namespace at `netns`, then connects.
fn connect_from(udp: bool, cgroup: &Path, netns: &Path, addr: SocketAddr) -> Result<Conn> {
    fs::write(cgroup.join("cgroup.procs"), b"0")
        .with_context(|| format!("entering cgroup {}", cgroup.display()))?;
    let own = fs::File::open("/proc/thread-self/ns/net")?;
    let target = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let enter = |f: &fs::File| -> Result<()> {
        // SAFETY: a valid namespace fd; this thread alone changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    enter(&target)?;
    let conn = if udp {
        UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| s.connect(addr).map(|()| s))
            .map(Conn::Udp)
    } else {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(Conn::Tcp)
    }
    .with_context(|| format!("connecting to {addr} from {}", cgroup.display()));
    enter(&own)?;
    let conn = conn?;
    match &conn {
        Conn::Tcp(s) => s.set_nodelay(true)?,
        Conn::Udp(s) => s.set_read_timeout(Some(Duration::from_secs(1)))?,
    }
    Ok(conn)
}

/// Helper: `tcp|udp SECS HOME KEY=CGROUP,NETNS,ADDR...`. The first mode is
/// the baseline. Runs batches on every connection in an order that
/// rotates, for SECS seconds, then moves back to HOME and prints
/// JSON: per mode the rate of its median batch, and the median of the
/// per-round ratios against the baseline.
pub fn client(args: &[String]) -> Result<()> {
    let udp = match args.first().map(String::as_str) {
        Some("tcp") => false,
        Some("udp") => true,
        other => bail!("protocol {other:?}: want tcp or udp"),
    };
    let secs: f64 = args.get(1).ok_or_else(|| anyhow!("seconds"))?.parse()?;
    let home = Path::new(args.get(2).ok_or_else(|| anyhow!("cgroup"))?);
    let mut keys = Vec::new();
    let mut conns = Vec::new();
    for spec in &args[3..] {
        let (key, rest) = spec.split_once('=').ok_or_else(|| anyhow!("mode {spec}"))?;
        let f: Vec<&str> = rest.split(',').collect();
        let [cg, ns, addr] = f[..] else {
            bail!("mode {spec}: want KEY=CGROUP,NETNS,ADDR");
        };
        let mut c = connect_from(udp, Path::new(cg), Path::new(ns), addr.parse()?)?;
        c.batch(BATCH)
            .with_context(|| format!("first batch of {key}"))?;
        keys.push(key.to_string());
        conns.push(c);
    }
    fs::write(home.join("cgroup.procs"), b"0")?;
    if conns.len() < 2 {
        bail!("want a baseline and at least one mode");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); conns.len()];
    let mut round = 0;
    while Instant::now() < deadline {
        for k in 0..conns.len() {
            let i = (k + round) % conns.len();
            times[i].push(conns[i].batch(BATCH)?);
        }
        round += 1;
    }
    let mut out = serde_json::Map::new();
    for (i, key) in keys.iter().enumerate() {
        let paired: Vec<f64> = times[0]
            .iter()
            .zip(&times[i])
            .map(|(base, t)| base / t)
            .collect();
        // Medians: a batch the kernel's RT throttle pauses for 50 ms would
        // outweigh a hundred others in a sum.
        out.insert(
            key.clone(),
            json!({
                "rate": BATCH as f64 / median(&times[i]),
                "paired_ratio_median": median(&paired),
            }),
        );
    }
    println!("{}", json!({"rounds": round, "batch": BATCH, "modes": out}));
    Ok(())
}
