//! A tiny network client/server for the end-to-end tests, run inside a
//! test's cgroup and network namespace. It prints one line saying what
//! happened, using errno names, so tests assert what a user would see.
//!
//!   probe connect tcp|udp ADDR:PORT       connect (and for tcp, send "ping")
//!   probe sendto udp ADDR:PORT            unconnected sendto
//!   probe raw4 | raw6 | packet            open a raw IP / packet socket
//!   probe serve tcp|udp ADDR:PORT SECS    count what arrives for SECS, print "got N"
//!   probe storm ADDR:PORT COUNT [PAUSE_US] COUNT UDP connect() calls, print "eperm N other M"
//!   probe trickle ADDR:PORT SECS          TCP connect, then a byte every 10 ms for SECS
//!   probe sink ADDR:PORT SECS             accept one TCP connection, print bytes and last arrival
//!   probe ask FROM:PORT ADDR:PORT         UDP from a bound socket: "ping", then "reply" if the
//!                                         answer comes back within a second
//!   probe hold ADDR:PORT SECS             TCP connect, a byte every 10 ms until a write fails:
//!                                         "error ERRNO at UNIX_NS", or "open" after SECS
//!   probe bind-many COUNT SECS            bind COUNT UDP sockets in 127.77.0.0/16, print
//!                                         "bound COUNT", hold them for SECS or until stdin
//!                                         closes, then "released"
//!   probe guard SECS KIND:ADDR:PORT...    for SECS, try each target in turn (KIND: udp-connect,
//!                                         udp-sendto, tcp with a 100 ms connect timeout) and
//!                                         print "UNIX_NS TARGET OUTCOME" whenever a target's
//!                                         outcome changes and for every attempt that went
//!                                         through (refused = EPERM, dropped = timed out,
//!                                         open = it went through), "UNIX_NS totals
//!                                         REFUSED OTHER" each second, then "rounds N"
//!   probe resolve SERVER:PORT NAME a|aaaa [any-source]
//!                                         DNS query over UDP: "addrs A,B" (the answer's
//!                                         addresses) or "error ERRNO"; any-source: an
//!                                         unconnected socket, reading an answer from
//!                                         any address
//!   probe lookup-connect SERVER:PORT NAME PORT COUNT
//!                                         COUNT times: look NAME up (A), TCP connect to the
//!                                         first address at once; "ok N failed M [FIRST_ERROR]"
//!   probe fake-resolver ADDR:PORT IP SECS [wrong-id | from ADDR]
//!                                         answer every query for SECS with one A record IP
//!                                         (TTL 300; with wrong-id, under another
//!                                         transaction id; with from, sent from ADDR and
//!                                         the same port); "answered N"
//!   probe tcp-resolve SERVER:PORT NAME1 NAME2
//!                                         both queries (A) over TCP in one write; read
//!                                         for 2 s: "read N" (bytes)
//!   probe fake-tcp-resolver ADDR:PORT IP SECS
//!                                         one TCP client: answer its first query with
//!                                         a message whose tail, sent as a segment of its
//!                                         own, reads as an answer (A IP) to the second
//!   probe verdicts                        for each address on stdin (one a line),
//!                                         UDP connect() to ADDR:53 and print the
//!                                         result (`ENETUNREACH` in a namespace with
//!                                         no route out means the hooks allowed it)
//!
//! Every loop is bounded by its SECS argument or a fixed count.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::EINPROGRESS) => "EINPROGRESS".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::ENOPROTOOPT) => "ENOPROTOOPT".into(),
        Some(libc::EPROTONOSUPPORT) => "EPROTONOSUPPORT".into(),
        Some(n) => format!("errno{n}"),
        None => e.to_string(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

fn connect(proto: &str, to: SocketAddr) -> String {
    match proto {
        "tcp" => match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(b"ping");
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4];
                match s.read_exact(&mut buf) {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("connected-but-{}", errno_name(&e)),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
            Err(e) => errno_name(&e),
        },
        "udp" => {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).expect("bind udp");
            match s.connect(to) {
                Ok(()) => match s.send(b"ping") {
                    Ok(_) => "ok".into(),
                    Err(e) => errno_name(&e),
                },
                Err(e) => errno_name(&e),
            }
        }
        other => panic!("unknown proto {other}"),
    }
}

fn sendto(to: SocketAddr) -> String {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).expect("bind udp");
    match s.send_to(b"ping", to) {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

/// Binds `from` (so the answer goes to a bound, owned socket), sends
/// "ping" to `to` and waits a second for the answer: `reply`, `no-reply`,
/// or the send's errno.
fn ask(from: SocketAddr, to: SocketAddr) -> String {
    let s = UdpSocket::bind(from).expect("bind udp");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    if let Err(e) = s.send_to(b"ping", to) {
        return errno_name(&e);
    }
    let mut buf = [0u8; 8];
    match s.recv_from(&mut buf) {
        Ok((n, _)) if &buf[..n] == b"pong" => "reply".into(),
        Ok(_) => "garbled".into(),
        Err(_) => "no-reply".into(),
    }
}

fn raw(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> String {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    if fd < 0 {
        return errno_name(&std::io::Error::last_os_error());
    }
    unsafe { libc::close(fd) };
    "ok".into()
}

/// Counts connections (tcp, answering "pong") or datagrams (udp).
fn serve(proto: &str, at: SocketAddr, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = 0u32;
    match proto {
        "tcp" => {
            let l = TcpListener::bind(at).expect("bind tcp");
            l.set_nonblocking(true).unwrap();
            println!("listening");
            while Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, _)) => {
                        got += 1;
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 4];
                        if s.read_exact(&mut buf).is_ok() {
                            let _ = s.write_all(b"pong");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        "udp" => {
            let s = UdpSocket::bind(at).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            println!("listening");
            let mut buf = [0u8; 64];
            while Instant::now() < deadline {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    got += 1;
                    let _ = s.send_to(b"pong", from);
                }
            }
        }
        other => panic!("unknown proto {other}"),
    }
    format!("got {got}")
}

/// UDP `connect()` (which sends nothing) to port 53 of every address read
/// from stdin, one result line per address line. Bounded by the input.
fn verdicts() -> String {
    use std::io::BufRead as _;
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0u64;
    for line in stdin.lines() {
        let line = line.expect("read stdin");
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let ip: std::net::IpAddr = line
            .parse()
            .unwrap_or_else(|e| panic!("bad address {line}: {e}"));
        let result = match UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }) {
            Ok(s) => match s.connect(SocketAddr::new(ip, 53)) {
                Ok(()) => "ok".into(),
                Err(e) => errno_name(&e),
            },
            Err(e) => format!("bind-{}", errno_name(&e)),
        };
        writeln!(out, "{result}").expect("write stdout");
        n += 1;
    }
    out.flush().expect("flush stdout");
    format!("done {n}")
}

/// `count` UDP connect() calls to one address (each one is a decision of
/// the connect hook; nothing is sent). Prints `eperm N other M`.
fn storm(to: SocketAddr, count: u32, pause_us: u64) -> String {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).expect("bind udp");
    let (mut eperm, mut other) = (0u32, 0u32);
    for _ in 0..count {
        match s.connect(to) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            _ => other += 1,
        }
        if pause_us > 0 {
            std::thread::sleep(Duration::from_micros(pause_us));
        }
    }
    format!("eperm {eperm} other {other}")
}

/// One forbidden attempt of `kind` to `to`: "refused" (EPERM), "dropped"
/// (no answer in time), "open" (it went through) or the errno's name.
fn attempt(kind: &str, to: SocketAddr) -> String {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let res = match kind {
        "udp-connect" => UdpSocket::bind(any).and_then(|s| s.connect(to)),
        "udp-sendto" => UdpSocket::bind(any).and_then(|s| s.send_to(b"x", to).map(drop)),
        "tcp" => TcpStream::connect_timeout(&to, Duration::from_millis(100)).map(drop),
        _ => panic!("unknown guard kind {kind}"),
    };
    match res {
        Ok(()) => "open".into(),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => "refused".into(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "dropped".into(),
        Err(e) => errno_name(&e),
    }
}

/// Forbidden attempts to every target in turn for `secs`, printing each
/// change of a target's outcome with the time the attempt started (for
/// "open") or ended (otherwise), so a test can line changes up with what
/// the agent was doing.
fn guard(secs: u64, targets: &[&str]) -> String {
    let targets: Vec<(&str, &str, SocketAddr)> = targets
        .iter()
        .map(|t| {
            let (kind, to) = t.split_once(':').expect("KIND:ADDR:PORT");
            (*t, kind, addr(to))
        })
        .collect();
    let mut last: Vec<String> = vec![String::new(); targets.len()];
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut next_totals = Instant::now();
    let (mut rounds, mut refused, mut other) = (0u64, 0u64, 0u64);
    let mut out = std::io::stdout().lock();
    while Instant::now() < deadline {
        rounds += 1;
        for (i, (name, kind, to)) in targets.iter().enumerate() {
            let started = unix_ns();
            let outcome = attempt(kind, *to);
            let at = if outcome == "open" {
                started
            } else {
                unix_ns()
            };
            if outcome == "refused" || outcome == "dropped" {
                refused += 1;
            } else {
                other += 1;
            }
            // Every attempt that went through is printed, not only the
            // change to it: a target that was open before enforcement began
            // and stayed open after would otherwise go unseen.
            if outcome != last[i] || outcome == "open" {
                let _ = writeln!(out, "{at} {name} {outcome}");
                let _ = out.flush();
                last[i] = outcome;
            }
        }
        // Running totals once a second, so a test can count the attempts
        // made while an agent of its choosing was in charge.
        if Instant::now() >= next_totals {
            let _ = writeln!(out, "{} totals {refused} {other}", unix_ns());
            let _ = out.flush();
            next_totals += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    format!("rounds {rounds}")
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Connects over TCP and sends one byte every 10 ms for `secs`, ignoring
/// send errors (a dropped flow just stops arriving). Prints `sent N`.
fn trickle(to: SocketAddr, secs: u64) -> String {
    let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return errno_name(&e),
    };
    println!("connected");
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u32;
    while Instant::now() < deadline {
        if s.write_all(b".").is_ok() {
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    format!("sent {sent}")
}

/// Connects, prints `connected`, then writes a byte every 10 ms for
/// `secs`; the first failing write ends it with `error ERRNO at UNIX_NS`
/// (when it failed), else `open`.
fn hold(to: SocketAddr, secs: u64) -> String {
    let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return errno_name(&e),
    };
    println!("connected");
    let _ = s.set_nodelay(true);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Err(e) = s.write_all(b".") {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            return format!("error {} at {at}", errno_name(&e));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    "open".into()
}

/// Binds `count` UDP sockets (to addresses of 127.77.0.0/16, port 0, so
/// no port range runs out), prints `bound COUNT` and holds them for `secs`
/// or until stdin closes: each is a socket the agent records the owner of.
fn bind_many(count: u32, secs: u64) -> String {
    let mut held = Vec::new();
    for i in 0..count {
        let ip = std::net::Ipv4Addr::new(127, 77, (i / 250) as u8, (1 + i % 250) as u8);
        match UdpSocket::bind((ip, 0)) {
            Ok(s) => held.push(s),
            Err(e) => return format!("bind-{} after {i}", errno_name(&e)),
        }
    }
    println!("bound {}", held.len());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(secs));
    "released".into()
}

/// Accepts one TCP connection and reads bytes for `secs`; prints `got N
/// last UNIX_NS`, the wall-clock time the last byte arrived.
fn sink(at: SocketAddr, secs: u64) -> String {
    let l = TcpListener::bind(at).expect("bind tcp");
    println!("listening");
    let deadline = Instant::now() + Duration::from_secs(secs);
    l.set_nonblocking(true).unwrap();
    let mut conn = loop {
        if Instant::now() > deadline {
            return "got 0 last 0".into();
        }
        match l.accept() {
            Ok((c, _)) => break c,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    conn.set_nonblocking(false).unwrap();
    let (mut got, mut last) = (0u64, 0u128);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let _ = conn.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ));
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got += n as u64;
                last = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
            }
            Err(_) => {}
        }
    }
    format!("got {got} last {last}")
}

/// Binds `local` (a port of its own, which a disconnect keeps), connects
/// to `peer` and has one exchange ("ping", then the answer: `reply` or
/// `no-reply`), and disconnects (`connect` with `AF_UNSPEC`). Then, for
/// `secs`: a datagram socket prints `from ADDR` for each datagram it
/// receives; a TCP socket listens (`listening`, or `listen-ERRNO` and
/// stops) and prints `accepted ADDR` for each connection. Ends with `done`.
fn disconnect(proto: &str, local: SocketAddr, peer: SocketAddr, secs: u64) -> String {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};

    let unspec = |fd: i32| {
        // SAFETY: a zeroed sockaddr with family AF_UNSPEC is what
        // connect(2) takes to dissolve an association.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
        if unsafe { libc::connect(fd, &sa, len) } != 0 {
            panic!("disconnect: {}", std::io::Error::last_os_error());
        }
    };
    let deadline = |secs| Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 64];
    match proto {
        "udp" => {
            let s = UdpSocket::bind(local).expect("bind udp");
            s.connect(peer).expect("connect udp");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send(b"ping").expect("send");
            let answer = s.recv(&mut buf).map_or("no-reply", |_| "reply");
            unspec(s.as_raw_fd());
            println!("{answer}");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let end = deadline(secs);
            while Instant::now() < end {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    println!("from {from}");
                }
            }
        }
        "tcp" => {
            let fd = Fd::for_addr(peer, libc::SOCK_STREAM, 0).expect("socket");
            fd.bind(local).unwrap_or_else(|e| panic!("bind: {e}"));
            fd.connect(peer).expect("connect");
            // SAFETY: the fd is a connected stream socket; the stream owns
            // it from here (and `fd`, forgotten, no longer closes it).
            let mut s = unsafe { TcpStream::from_raw_fd(fd.0) };
            std::mem::forget(fd);
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"ping").expect("send");
            let answer = s.read_exact(&mut buf[..4]).map_or("no-reply", |()| "reply");
            let fd = s.into_raw_fd();
            unspec(fd);
            println!("{answer}");
            // SAFETY: `fd` is the stream's socket, whose ownership was
            // just released; the listener owns it from here.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            if unsafe { libc::listen(fd, 8) } != 0 {
                return format!("listen-{}", last_errno());
            }
            println!("listening");
            l.set_nonblocking(true).unwrap();
            let end = deadline(secs);
            while Instant::now() < end {
                match l.accept() {
                    Ok((_, from)) => println!("accepted {from}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        other => panic!("unknown proto {other}"),
    }
    "done".into()
}

/// A datagram socket bound to `local`, driven by stdin: prints `ready`,
/// then one line per command line: `connect ADDR`, `send` (to the
/// connected peer) and `sendto ADDR` print `ok` or the errno; `recv MS`
/// prints `from ADDR` for a datagram received within MS milliseconds, or
/// `none`. Bounded by the input.
fn udp_script(local: SocketAddr) -> String {
    use std::io::BufRead as _;
    let s = UdpSocket::bind(local).expect("bind udp");
    println!("ready");
    let mut buf = [0u8; 64];
    for line in std::io::stdin().lock().lines().take(1000) {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let sent = |r: std::io::Result<usize>| r.map_or_else(|e| errno_name(&e), |_| "ok".into());
        let out = match words.as_slice() {
            ["connect", to] => s
                .connect(addr(to))
                .map_or_else(|e| errno_name(&e), |()| "ok".into()),
            ["send"] => sent(s.send(b"ping")),
            ["sendto", to] => sent(s.send_to(b"ping", addr(to))),
            ["recv", ms] => {
                let ms = ms.parse().expect("ms");
                s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
                s.recv_from(&mut buf)
                    .map_or_else(|_| "none".into(), |(_, from)| format!("from {from}"))
            }
            other => panic!("unknown command {other:?}"),
        };
        println!("{out}");
    }
    "done".into()
}

/// Connects to `to` from `from` (TCP, bound first), giving up after 2 s:
/// `ok` or the errno (`EINPROGRESS`: no answer within 2 s).
fn connect_from(from: SocketAddr, to: SocketAddr) -> String {
    let s = match Fd::for_addr(to, libc::SOCK_STREAM, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Err(e) = s.bind(from) {
        return format!("bind-{e}");
    }
    // connect(2) gives up after the send timeout.
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid fd, option and value.
    unsafe {
        libc::setsockopt(
            s.0,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    result(s.connect(to))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Some(out) = bypass(&a) {
        println!("{out}");
        return ExitCode::SUCCESS;
    }
    let out = match a.as_slice() {
        ["connect", proto, to] => connect(proto, addr(to)),
        ["sendto", "udp", to] => sendto(addr(to)),
        ["raw4"] => raw(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        ["raw6"] => raw(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
        ["packet"] => raw(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        ),
        ["serve", proto, at, secs] => serve(proto, addr(at), secs.parse().expect("secs")),
        ["verdicts"] => verdicts(),
        ["storm", to, count] => storm(addr(to), count.parse().expect("count"), 0),
        ["storm", to, count, pause_us] => storm(
            addr(to),
            count.parse().expect("count"),
            pause_us.parse().expect("pause"),
        ),
        ["trickle", to, secs] => trickle(addr(to), secs.parse().expect("secs")),
        ["sink", at, secs] => sink(addr(at), secs.parse().expect("secs")),
        ["hold", to, secs] => hold(addr(to), secs.parse().expect("secs")),
        ["bind-many", count, secs] => {
            bind_many(count.parse().expect("count"), secs.parse().expect("secs"))
        }
        ["ask", from, to] => ask(addr(from), addr(to)),
        ["guard", secs, targets @ ..] => guard(secs.parse().expect("secs"), targets),
        ["resolve", server, name, kind, how @ ..] => {
            match lookup(addr(server), name, *kind == "aaaa", how == ["any-source"]) {
                Ok(addrs) => format!(
                    "addrs {}",
                    addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Err(e) => format!("error {}", errno_name(&e)),
            }
        }
        ["lookup-connect", server, name, port, count] => lookup_connect(
            addr(server),
            name,
            port.parse().expect("port"),
            count.parse().expect("count"),
        ),
        ["tcp-resolve", server, first, second] => tcp_resolve(addr(server), first, second),
        ["fake-tcp-resolver", at, ip, secs] => fake_tcp_resolver(
            addr(at),
            ip.parse().expect("ip"),
            secs.parse().expect("secs"),
        ),
        ["fake-resolver", at, ip, secs, rest @ ..] => fake_resolver(
            addr(at),
            ip.parse().expect("ip"),
            secs.parse().expect("secs"),
            rest == ["wrong-id"],
            match rest {
                ["from", a] => Some(a.parse().expect("from address")),
                _ => None,
            },
        ),
        _ => {
            eprintln!("usage: probe connect|sendto|raw4|raw6|packet|serve|verdicts ...");
            return ExitCode::from(2);
        }
    };
    println!("{out}");
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------
// DNS (issue 19): a stub resolver's query and answer, as libc sends them.

fn dns_query(id: u16, name: &str, aaaa: bool) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&[0, if aaaa { 28 } else { 1 }, 0, 1]);
    m
}

/// One query to `server`, its answer's addresses (an answer with none is
/// an error, as for a stub resolver). `any_source`: the socket is not
/// connected, so it reads an answer from any address.
fn lookup(
    server: SocketAddr,
    name: &str,
    aaaa: bool,
    any_source: bool,
) -> std::io::Result<Vec<std::net::IpAddr>> {
    use bulkhead_common::dns;
    use std::net::IpAddr;
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    if !any_source {
        s.connect(server)?;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let id = (std::process::id() as u16) ^ (nanos as u16);
    s.send_to(&dns_query(id, name, aaaa), server)?;
    let mut scratch = Box::new(dns::Scratch::new());
    let (n, _) = s.recv_from(&mut scratch.buf)?;
    let bad = |what: &str| std::io::Error::other(what.to_string());
    let q = dns::question_hashed(&mut scratch, n).ok_or_else(|| bad("no answer"))?;
    if q.id != id {
        return Err(bad("wrong transaction id"));
    }
    let mut pos = q.next;
    let mut out = Vec::new();
    for _ in 0..q.answers {
        let Some(r) = dns::record(&scratch.buf, n, pos) else {
            break;
        };
        pos = r.next;
        match r.family {
            2 => out.push(IpAddr::from([r.addr[0], r.addr[1], r.addr[2], r.addr[3]])),
            10 => out.push(IpAddr::from(r.addr)),
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(bad("no address in the answer"));
    }
    Ok(out)
}

fn lookup_connect(server: SocketAddr, name: &str, port: u16, count: u32) -> String {
    let (mut ok, mut failed) = (0, 0);
    let mut first = String::new();
    for _ in 0..count {
        let r = lookup(server, name, false, false).and_then(|addrs| {
            TcpStream::connect_timeout(&SocketAddr::new(addrs[0], port), Duration::from_secs(2))
        });
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                if first.is_empty() {
                    first = format!(" {}", errno_name(&e));
                }
            }
        }
    }
    format!("ok {ok} failed {failed}{first}")
}

/// Answers every query with one A record, for `secs` (see the usage).
fn fake_resolver(
    at: SocketAddr,
    ip: std::net::Ipv4Addr,
    secs: u64,
    wrong_id: bool,
    from: Option<std::net::IpAddr>,
) -> String {
    let s = UdpSocket::bind(at).expect("bind");
    let out = from.map(|a| UdpSocket::bind(SocketAddr::new(a, at.port())).expect("bind from"));
    println!("listening");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut answered = 0;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        if n < 17 {
            continue;
        }
        let mut m = buf[..n].to_vec();
        if wrong_id {
            m[1] ^= 1;
        }
        m[2] = 0x81;
        m[3] = 0x80;
        m[6] = 0;
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
        m.extend_from_slice(&ip.octets());
        if out.as_ref().unwrap_or(&s).send_to(&m, from).is_ok() {
            answered += 1;
        }
    }
    format!("answered {answered}")
}

/// `tcp-resolve`: both queries (A) over one TCP connection, written at
/// once as glibc does; reads for up to 2 s. Prints "read N" (bytes).
fn tcp_resolve(server: SocketAddr, first: &str, second: &str) -> String {
    let mut s = match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return format!("error {}", errno_name(&e)),
    };
    let mut out = Vec::new();
    for (id, name) in [(0x1111u16, first), (0x2222, second)] {
        let q = dns_query(id, name, false);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    if let Err(e) = s.write_all(&out) {
        return format!("error {}", errno_name(&e));
    }
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    format!("read {}", got.len())
}

/// `fake-tcp-resolver`: for one connection, answers the first of two
/// queries with a message whose tail (after its question) is bytes that
/// read as an answer to the second one, giving `ip`, and sends that tail
/// as a segment of its own: what a workload could shape inside a real
/// answer (a name it asked for, a record of its own zone) and hope to
/// have read as a message of its own. Prints "sent N".
fn fake_tcp_resolver(at: SocketAddr, ip: std::net::Ipv4Addr, secs: u64) -> String {
    let l = TcpListener::bind(at).expect("bind");
    println!("listening");
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return "sent 0".into(),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    // Both queries, each after its length.
    let queries = loop {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return "sent 0".into(),
            Ok(k) => n += k,
        }
        let first = u16::from_be_bytes([buf[0], buf[1]]) as usize;
        if n >= 2 + first + 2 {
            let second = u16::from_be_bytes([buf[2 + first], buf[3 + first]]) as usize;
            if n >= 4 + first + second {
                break (
                    buf[2..2 + first].to_vec(),
                    buf[4 + first..4 + first + second].to_vec(),
                );
            }
        }
    };
    let answer = |q: &[u8], records: &[u8]| {
        let mut m = q.to_vec();
        m[2] = 0x81;
        m[3] = 0x80;
        m[6] = 0;
        m[7] = u8::from(!records.is_empty());
        m.extend_from_slice(records);
        m
    };
    let mut a = vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4];
    a.extend_from_slice(&ip.octets());
    let inner = answer(&queries.1, &a);
    let head = answer(&queries.0, &[]);
    let mut tail = (inner.len() as u16).to_be_bytes().to_vec();
    tail.extend_from_slice(&inner);
    let total = (head.len() + tail.len()) as u16;
    let mut first = total.to_be_bytes().to_vec();
    first.extend_from_slice(&head);
    let mut sent = 0;
    for part in [first, tail] {
        if s.write_all(&part).is_ok() {
            sent += part.len();
        }
        // Its own segment.
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    format!("sent {sent}")
}

// ---------------------------------------------------------------------------
// Bypass attempts and packet tests (issue 9). Dispatched from `main` through
// `bypass`; each prints one result line like the commands above.
//
//   probe tfo ADDR:PORT                   TCP Fast Open: sendto(MSG_FASTOPEN) on a fresh socket
//   probe ping connect|sendto ADDR        ICMP/ICMPv6 echo over a ping socket (SOCK_DGRAM)
//   probe mptcp ADDR:PORT                 Multipath TCP connect, send "ping", await the answer
//   probe packet-send DST:PORT            AF_PACKET (SOCK_DGRAM) frame carrying IPv4/UDP to
//                                         DST:PORT, out of the first non-loopback interface
//   probe inet-sock-packet                socket(AF_INET, SOCK_PACKET): the obsolete spelling
//   probe sendmmsg ADDR:PORT...           one sendmmsg() to every destination; prints one
//                                         result per destination, comma-separated
//   probe session tcp|udp ADDR:PORT       connect, print "connected", then send one byte per
//                                         stdin line and print the result; "done" at EOF
//   probe dgram-session ADDR:PORT         an unconnected UDP socket: print "ready", then per
//                                         stdin line sendto ADDR:PORT (empty line) or move
//                                         into a cgroup (`move PROCS`), printing each result
//   probe disconnect tcp|udp LOCAL PEER SECS
//                                         bind LOCAL, connect to PEER, "ping" and "reply" (or
//                                         "no-reply"), connect(AF_UNSPEC); then for SECS print
//                                         "from ADDR" per datagram (udp), or listen and print
//                                         "listening" (or "listen-ERRNO" and stop) and
//                                         "accepted ADDR" per connection (tcp); "done"
//   probe connect-from FROM:PORT ADDR:PORT  TCP connect from a bound address, 2 s at most
//                                         (EINPROGRESS: no answer by then)
//   probe udp-script LOCAL                a UDP socket bound to LOCAL: print "ready", then per
//                                         stdin line `connect ADDR`, `send`, `sendto ADDR` (ok
//                                         or errno) or `recv MS` ("from ADDR" or "none")
//   probe iouring-connect tcp|udp ADDR:PORT  IORING_OP_CONNECT
//   probe premove PROCS tcp|udp ADDR:PORT create the socket, move into the cgroup whose
//                                         cgroup.procs is PROCS, then connect (tcp) / sendto (udp)
//   probe move PROCS CMD...               move into that cgroup, then run CMD
//   probe thread CMD...                   run CMD on a new thread
//   probe as-user UID CMD...              drop to UID/GID (and so every capability), then run CMD
//   probe testrun LINK                    BPF_PROG_TEST_RUN of the program behind the pinned
//                                         link LINK on every hex packet read from stdin (one a
//                                         line, Ethernet header included); prints each return
//                                         code, then "done N"

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn last_errno() -> String {
    errno_name(&std::io::Error::last_os_error())
}

/// A socket(2) whose fd is closed on drop.
struct Fd(libc::c_int);

impl Fd {
    fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> Result<Fd, String> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            Err(last_errno())
        } else {
            Ok(Fd(fd))
        }
    }

    fn for_addr(to: SocketAddr, ty: libc::c_int, proto: libc::c_int) -> Result<Fd, String> {
        let domain = if to.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        Fd::socket(domain, ty, proto)
    }

    fn bind(&self, at: SocketAddr) -> Result<(), String> {
        let (ss, len) = sockaddr(at);
        // SAFETY: valid fd and address.
        let rc = unsafe { libc::bind(self.0, (&raw const ss).cast(), len) };
        if rc < 0 { Err(last_errno()) } else { Ok(()) }
    }

    fn connect(&self, to: SocketAddr) -> Result<(), String> {
        let (ss, len) = sockaddr(to);
        // SAFETY: valid fd and address.
        let rc = unsafe { libc::connect(self.0, (&raw const ss).cast(), len) };
        if rc < 0 { Err(last_errno()) } else { Ok(()) }
    }

    fn send_to(
        &self,
        buf: &[u8],
        flags: libc::c_int,
        to: Option<SocketAddr>,
    ) -> Result<(), String> {
        let rc = match to {
            Some(to) => {
                let (ss, len) = sockaddr(to);
                // SAFETY: valid fd, buffer and address.
                unsafe {
                    libc::sendto(
                        self.0,
                        buf.as_ptr().cast(),
                        buf.len(),
                        flags,
                        (&raw const ss).cast(),
                        len,
                    )
                }
            }
            // SAFETY: valid fd and buffer.
            None => unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), flags) },
        };
        if rc < 0 { Err(last_errno()) } else { Ok(()) }
    }

    /// Waits up to `ms` for something to read; `Ok(n)` with the byte count.
    fn recv_within(&self, ms: i32) -> Result<usize, String> {
        let mut p = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            return Err("ETIMEDOUT".into());
        }
        let mut buf = [0u8; 256];
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(last_errno())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn result(r: Result<(), String>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e,
    }
}

fn tfo(to: SocketAddr) -> String {
    let s = match Fd::for_addr(to, libc::SOCK_STREAM, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    // The SYN carries the data (or a cookie request): connect and send in one call.
    if let Err(e) = s.send_to(b"ping", libc::MSG_FASTOPEN, Some(to)) {
        return e;
    }
    match s.recv_within(2000) {
        Ok(_) => "ok".into(),
        Err(e) => format!("sent-but-{e}"),
    }
}

/// A Multipath TCP connect (`IPPROTO_MPTCP`): the kernel opens the real
/// TCP subflows itself.
fn mptcp(to: SocketAddr) -> String {
    let s = match Fd::for_addr(to, libc::SOCK_STREAM, libc::IPPROTO_MPTCP) {
        Ok(s) => s,
        Err(e) => return format!("socket-{e}"),
    };
    if let Err(e) = s.connect(to) {
        return e;
    }
    if let Err(e) = s.send_to(b"ping", libc::MSG_NOSIGNAL, None) {
        return format!("connected-but-{e}");
    }
    match s.recv_within(2000) {
        Ok(_) => "ok".into(),
        Err(e) => format!("connected-but-{e}"),
    }
}

fn ping(mode: &str, to: std::net::IpAddr) -> String {
    let to = SocketAddr::new(to, 0);
    let (proto, ty) = if to.is_ipv4() {
        (libc::IPPROTO_ICMP, 8u8)
    } else {
        (libc::IPPROTO_ICMPV6, 128u8)
    };
    let s = match Fd::for_addr(to, libc::SOCK_DGRAM, proto) {
        Ok(s) => s,
        Err(e) => return format!("socket-{e}"),
    };
    // Echo request; the kernel fills in the identifier and the checksum.
    let msg = [ty, 0, 0, 0, 0, 0, 0, 1, b'b', b'u', b'l', b'k'];
    let sent = match mode {
        "connect" => s.connect(to).and_then(|()| s.send_to(&msg, 0, None)),
        "sendto" => s.send_to(&msg, 0, Some(to)),
        other => panic!("unknown ping mode {other}"),
    };
    if let Err(e) = sent {
        return e;
    }
    match s.recv_within(1000) {
        Ok(_) => "ok".into(),
        Err(e) => format!("sent-but-{e}"),
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The first interface that is not loopback, by name and index.
fn first_link() -> Option<(String, u32)> {
    // SAFETY: if_nameindex returns an array ending with a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return None;
        }
        let mut found = None;
        let mut i = 0;
        while i < 256 && (*list.add(i)).if_index != 0 {
            let e = &*list.add(i);
            let name = std::ffi::CStr::from_ptr(e.if_name)
                .to_string_lossy()
                .into_owned();
            if name != "lo" {
                found = Some((name, e.if_index));
                break;
            }
            i += 1;
        }
        libc::if_freenameindex(list);
        found
    }
}

/// An IPv4/UDP datagram to `to`, built by hand and handed to the link layer,
/// broadcast: nothing of the IP stack (and none of its hooks) sees it.
fn packet_send(to: SocketAddr) -> String {
    let SocketAddr::V4(to) = to else {
        panic!("packet-send takes an IPv4 destination")
    };
    let Some((_, ifindex)) = first_link() else {
        return "no-interface".into();
    };
    let proto = (libc::ETH_P_IP as u16).to_be();
    let s = match Fd::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) {
        Ok(s) => s,
        Err(e) => return format!("socket-{e}"),
    };
    // Claim the first address of the destination's /24 as the source.
    let d = to.ip().octets();
    let src = [d[0], d[1], d[2], 1];
    let payload = b"ping";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, total as u8, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&d);
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = proto;
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: valid fd, buffer and sockaddr_ll.
    let rc = unsafe {
        libc::sendto(
            s.0,
            p.as_ptr().cast(),
            p.len(),
            0,
            (&raw const ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 { last_errno() } else { "ok".into() }
}

/// One `sendmmsg()` to all destinations; after a short count, the rest are
/// retried one call each (the kernel reports the error on the next call).
fn sendmmsg(dsts: &[SocketAddr]) -> String {
    let s = match Fd::for_addr(dsts[0], libc::SOCK_DGRAM, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        dsts.iter().map(|d| sockaddr(*d)).collect();
    let mut payload = *b"ping";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|(ss, len)| {
            // SAFETY: all-zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&raw mut *ss).cast();
            h.msg_namelen = *len;
            h.msg_iov = &raw mut iov;
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < msgs.len() {
        let rest = &mut msgs[i..];
        // SAFETY: valid fd and mmsghdr array of that length.
        let n = unsafe { libc::sendmmsg(s.0, rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n < 0 {
            out.push(last_errno());
            i += 1;
        } else if n == 0 {
            out.push("zero".into());
            i += 1;
        } else {
            for _ in 0..n {
                out.push("ok".into());
            }
            i += n as usize;
        }
    }
    out.join(",")
}

/// Connects, then sends one byte per stdin line, printing each result, so a
/// test can change the policy between sends.
fn session(proto: &str, to: SocketAddr) -> String {
    use std::io::BufRead as _;
    let ty = if proto == "tcp" {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let s = match Fd::for_addr(to, ty, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Err(e) = s.connect(to) {
        return e;
    }
    println!("connected");
    let mut n = 0u32;
    for line in std::io::stdin().lock().lines().take(1000) {
        if line.is_err() {
            break;
        }
        println!("{}", result(s.send_to(b"x", libc::MSG_NOSIGNAL, None)));
        n += 1;
    }
    format!("done {n}")
}

/// An unconnected datagram socket: prints "ready", then for each stdin
/// line sends one datagram to `to` with `sendto` (an empty line) or moves
/// the process into another cgroup (`move PROCS`), printing the result.
fn dgram_session(to: SocketAddr) -> String {
    use std::io::BufRead as _;
    let s = match Fd::for_addr(to, libc::SOCK_DGRAM, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    println!("ready");
    let mut n = 0u32;
    for line in std::io::stdin().lock().lines().take(1000) {
        let Ok(line) = line else { break };
        match line.strip_prefix("move ") {
            Some(procs) => {
                move_self(procs);
                println!("moved");
            }
            None => println!("{}", result(s.send_to(b"x", 0, Some(to)))),
        }
        n += 1;
    }
    format!("done {n}")
}

fn iouring_connect(proto: &str, to: SocketAddr) -> String {
    let ty = if proto == "tcp" {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let s = match Fd::for_addr(to, ty, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return format!("io_uring-{}", errno_name(&e)),
    };
    let (ss, len) = sockaddr(to);
    let op = io_uring::opcode::Connect::new(io_uring::types::Fd(s.0), (&raw const ss).cast(), len)
        .build()
        .user_data(1);
    // SAFETY: `ss` outlives the submission (we wait for its completion below).
    if unsafe { ring.submission().push(&op) }.is_err() {
        return "queue-full".into();
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return format!("submit-{}", errno_name(&e));
    }
    let Some(cqe) = ring.completion().next() else {
        return "no-completion".into();
    };
    let rc = cqe.result();
    if rc < 0 {
        errno_name(&std::io::Error::from_raw_os_error(-rc))
    } else if proto == "tcp" {
        result(s.send_to(b"ping", libc::MSG_NOSIGNAL, None))
    } else {
        "ok".into()
    }
}

fn move_self(procs: &str) {
    std::fs::write(procs, std::process::id().to_string())
        .unwrap_or_else(|e| panic!("moving into {procs}: {e}"));
}

/// The socket exists before the process moves into the domain cgroup.
fn premove(procs: &str, proto: &str, to: SocketAddr) -> String {
    let ty = if proto == "tcp" {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let s = match Fd::for_addr(to, ty, 0) {
        Ok(s) => s,
        Err(e) => return e,
    };
    move_self(procs);
    if proto == "tcp" {
        result(s.connect(to))
    } else {
        result(s.send_to(b"ping", 0, Some(to)))
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex byte"))
        .collect()
}

/// `union bpf_attr` as bytes.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> Result<i64, String> {
    // SAFETY: `attr` is a writable bpf_attr-sized buffer.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 { Err(last_errno()) } else { Ok(rc) }
}

/// The program behind a pinned link: BPF_OBJ_GET, the link's info
/// (`prog_id`), BPF_PROG_GET_FD_BY_ID.
fn link_prog(link: &str) -> Result<Fd, String> {
    let path = std::ffi::CString::new(link).expect("path");
    let mut a = BpfAttr([0; 128]);
    a.0[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let link_fd = Fd(bpf(7, &mut a)? as i32);
    let mut info = [0u8; 64];
    let mut a = BpfAttr([0; 128]);
    a.0[..4].copy_from_slice(&(link_fd.0 as u32).to_ne_bytes());
    a.0[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    a.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(15, &mut a)?;
    let prog_id = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    let mut a = BpfAttr([0; 128]);
    a.0[..4].copy_from_slice(&prog_id.to_ne_bytes());
    Ok(Fd(bpf(13, &mut a)? as i32))
}

/// BPF_PROG_TEST_RUN once; the program's return code.
fn test_run(prog: &Fd, pkt: &[u8]) -> Result<u32, String> {
    let mut a = BpfAttr([0; 128]);
    a.0[..4].copy_from_slice(&(prog.0 as u32).to_ne_bytes());
    a.0[8..12].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    a.0[16..24].copy_from_slice(&(pkt.as_ptr() as u64).to_ne_bytes());
    a.0[32..36].copy_from_slice(&1u32.to_ne_bytes());
    bpf(10, &mut a)?;
    Ok(u32::from_ne_bytes(a.0[4..8].try_into().expect("4 bytes")))
}

fn testrun(link: &str) -> String {
    use std::io::BufRead as _;
    let prog = match link_prog(link) {
        Ok(p) => p,
        Err(e) => return format!("link-{e}"),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("read stdin");
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r = match test_run(&prog, &hex(line)) {
            Ok(rc) => rc.to_string(),
            Err(e) => e,
        };
        writeln!(out, "{r}").expect("write stdout");
        n += 1;
    }
    out.flush().expect("flush stdout");
    format!("done {n}")
}

/// The issue 9 subcommands; `None` when `a` is none of them.
fn bypass(a: &[&str]) -> Option<String> {
    Some(match a {
        ["connect", proto, to] => connect(proto, addr(to)),
        ["sendto", "udp", to] => sendto(addr(to)),
        ["tfo", to] => tfo(addr(to)),
        ["mptcp", to] => mptcp(addr(to)),
        ["ping", mode, ip] => ping(mode, ip.parse().expect("ip address")),
        ["packet-send", to] => packet_send(addr(to)),
        // SOCK_PACKET is the obsolete spelling of AF_PACKET that the
        // kernel still converts; the test checks it is refused the same way.
        ["raw4"] => raw(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        ["raw6"] => raw(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
        ["packet"] => raw(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        ),
        ["inet-sock-packet"] => raw(
            libc::AF_INET,
            #[expect(deprecated, reason = "the obsolete spelling is the point")]
            libc::SOCK_PACKET,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        ),
        ["sendmmsg", dsts @ ..] if !dsts.is_empty() => {
            sendmmsg(&dsts.iter().map(|d| addr(d)).collect::<Vec<_>>())
        }
        ["session", proto, to] => session(proto, addr(to)),
        ["dgram-session", to] => dgram_session(addr(to)),
        ["disconnect", proto, local, peer, secs] => {
            disconnect(proto, addr(local), addr(peer), secs.parse().expect("secs"))
        }
        ["connect-from", from, to] => connect_from(addr(from), addr(to)),
        ["udp-script", local] => udp_script(addr(local)),
        ["iouring-connect", proto, to] => iouring_connect(proto, addr(to)),
        ["premove", procs, proto, to] => premove(procs, proto, addr(to)),
        ["move", procs, rest @ ..] => {
            move_self(procs);
            bypass(rest)?
        }
        ["thread", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            std::thread::spawn(move || {
                let r: Vec<&str> = rest.iter().map(String::as_str).collect();
                bypass(&r)
            })
            .join()
            .expect("thread")?
        }
        ["testrun", link] => testrun(link),
        ["as-user", uid, rest @ ..] => {
            let id: libc::uid_t = uid.parse().expect("uid");
            // SAFETY: plain credential syscalls; a failure is fatal below.
            let ok = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(id) == 0
                    && libc::setuid(id) == 0
            };
            assert!(
                ok,
                "dropping to uid {id}: {}",
                std::io::Error::last_os_error()
            );
            bypass(rest)?
        }
        _ => return None,
    })
}
