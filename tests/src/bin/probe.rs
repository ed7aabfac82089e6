//! A tiny network client/server for the end-to-end tests, run inside a
//! test's cgroup and network namespace. It prints one line saying what
//! happened, using errno names, so tests assert what a user would see.
//!
//!   probe connect tcp|udp ADDR:PORT       connect (and for tcp, send "ping")
//!   probe sendto udp ADDR:PORT            unconnected sendto
//!   probe raw4 | raw6 | packet            open a raw IP / packet socket
//!   probe serve tcp|udp ADDR:PORT SECS    count what arrives for SECS, print "got N"
//!   probe storm ADDR:PORT COUNT           COUNT UDP connect() calls, print "eperm N other M"
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
fn storm(to: SocketAddr, count: u32) -> String {
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
    }
    format!("eperm {eperm} other {other}")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
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
        ["storm", to, count] => storm(addr(to), count.parse().expect("count")),
        _ => {
            eprintln!("usage: probe connect|sendto|raw4|raw6|packet|serve|verdicts ...");
            return ExitCode::from(2);
        }
    };
    println!("{out}");
    ExitCode::SUCCESS
}
