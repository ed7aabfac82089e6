//! Request/response, short connections and datagram sends measured A/B
//! within one process: each mode has its cgroup and network namespace,
//! and short batches run on each mode in turn. Modes a few milliseconds
//! apart share the machine's state — a VM's neighbours, the CPU's clock —
//! which separate runs seconds apart do not: there a run scatters by ±10%,
//! more than the few percent being measured.
//!
//! - `tcp`, `udp`: one connection per mode, opened from its cgroup and
//!   namespace (a socket keeps both for life, and the packet hooks act on
//!   the socket's cgroup); 64 B each way.
//! - `crr`: a new TCP connection per transaction (connect, 1 B each way,
//!   close with RST), and `send`: unconnected `sendto`s of 64 B. The
//!   connect and sendmsg hooks decide by the calling task's cgroup, so the
//!   client moves into the mode's cgroup and namespace before each batch
//!   (outside the batch's time).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
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
/// thread each) and every UDP datagram to `PORT`, and takes datagrams to
/// `PORT + 1` without answering (the `send` test's sink). Exits after the
/// given number of seconds at the latest.
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
    let sink = UdpSocket::bind(("0.0.0.0", port + 1))?;
    std::thread::spawn(move || {
        let mut b = [0u8; MSG];
        while sink.recv(&mut b).is_ok() {}
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

/// A mode's cgroup and network namespace.
struct Place {
    cgroup: PathBuf,
    netns: fs::File,
}

impl Place {
    fn new(cgroup: &Path, netns: &Path) -> Result<Place> {
        Ok(Place {
            cgroup: cgroup.to_path_buf(),
            netns: fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?,
        })
    }

    /// Moves this (single-threaded) process into the cgroup, and this
    /// thread into the namespace.
    fn enter(&self) -> Result<()> {
        fs::write(self.cgroup.join("cgroup.procs"), b"0")
            .with_context(|| format!("entering cgroup {}", self.cgroup.display()))?;
        setns(&self.netns)
    }
}

fn setns(f: &fs::File) -> Result<()> {
    // SAFETY: a valid namespace fd; this thread alone changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Closes with RST: no TIME_WAIT, so a connection loop does not run out
/// of ports.
pub fn close_with_rst(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// What one mode's batches run on.
enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
    /// A new connection per transaction, made from the place.
    Crr(Place, SocketAddr),
    /// Unconnected datagrams to one address, sent from the place.
    Send(Place, UdpSocket, SocketAddr),
}

impl Conn {
    /// `n` transactions (datagrams); returns the seconds they took.
    fn batch(&mut self, n: usize) -> Result<f64> {
        match self {
            Conn::Crr(p, _) | Conn::Send(p, ..) => p.enter()?,
            Conn::Tcp(_) | Conn::Udp(_) => {}
        }
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
                Conn::Crr(_, addr) => {
                    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(1))?;
                    close_with_rst(&s);
                    s.write_all(&b[..1])?;
                    s.read_exact(&mut b[..1])?;
                }
                Conn::Send(_, s, addr) => {
                    s.send_to(&b, *addr)?;
                }
            }
        }
        Ok(start.elapsed().as_secs_f64())
    }
}

/// Opens a mode's connection (or socket) from its cgroup and namespace.
fn connect_from(proto: &str, cgroup: &Path, netns: &Path, addr: SocketAddr) -> Result<Conn> {
    let place = Place::new(cgroup, netns)?;
    let own = fs::File::open("/proc/thread-self/ns/net")?;
    place.enter()?;
    let conn = match proto {
        "udp" => UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| s.connect(addr).map(|()| s))
            .map(Conn::Udp),
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(Conn::Tcp),
        "send" => UdpSocket::bind(("0.0.0.0", 0)).map(|s| Conn::Send(place, s, addr)),
        _ => Ok(Conn::Crr(place, addr)),
    }
    .with_context(|| format!("connecting to {addr} from {}", cgroup.display()));
    setns(&own)?;
    let conn = conn?;
    match &conn {
        Conn::Tcp(s) => s.set_nodelay(true)?,
        Conn::Udp(s) => s.set_read_timeout(Some(Duration::from_secs(1)))?,
        Conn::Crr(..) | Conn::Send(..) => {}
    }
    Ok(conn)
}

/// Helper: `tcp|udp|crr|send SECS HOME KEY=CGROUP,NETNS,ADDR...`. The
/// first mode is the baseline. Runs batches on every mode in an order
/// that rotates, for SECS seconds, then moves back to HOME and prints
/// JSON: per mode the rate of its median batch, and the median of the
/// per-round ratios against the baseline.
pub fn client(args: &[String]) -> Result<()> {
    let proto = args.first().map_or("", String::as_str);
    // Each batch a few milliseconds (a datagram send is ~1 µs).
    let batch = match proto {
        "tcp" | "udp" => BATCH,
        "crr" => BATCH / 2,
        "send" => BATCH * 10,
        other => bail!("protocol {other:?}: want tcp, udp, crr or send"),
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
        let mut c = connect_from(proto, Path::new(cg), Path::new(ns), addr.parse()?)?;
        c.batch(batch)
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
            times[i].push(conns[i].batch(batch)?);
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
                "rate": batch as f64 / median(&times[i]),
                "paired_ratio_median": median(&paired),
            }),
        );
    }
    println!("{}", json!({"rounds": round, "batch": batch, "modes": out}));
    Ok(())
}
