//! A tiny MaxMind DB writer for test fixtures (MaxMind DB format 2.0: a
//! binary search tree, a 16-byte separator, a data section, a metadata
//! marker and a metadata map). Not needed outside tests: the agent only
//! reads databases.

use std::net::IpAddr;

use ipnet::IpNet;

/// A data-section value.
#[derive(Clone, Debug)]
pub enum Value {
    Map(Vec<(&'static str, Value)>),
    Str(String),
    U16(u16),
    U32(u32),
    U64(u64),
    Bool(bool),
    Array(Vec<Value>),
}

pub fn s(text: &str) -> Value {
    Value::Str(text.to_string())
}

#[derive(Clone, Copy, Debug)]
enum Rec {
    Empty,
    Node(usize),
    Data(usize),
}

pub struct TestDb {
    pub ip_version: u16,
    pub record_size: u16,
    pub database_type: String,
    pub build_epoch: u64,
    nodes: Vec<[Rec; 2]>,
    data: Vec<Value>,
}

impl TestDb {
    pub fn new(ip_version: u16, database_type: &str) -> TestDb {
        TestDb {
            ip_version,
            record_size: 24,
            database_type: database_type.to_string(),
            build_epoch: 1_700_000_000,
            nodes: vec![[Rec::Empty; 2]],
            data: Vec::new(),
        }
    }

    /// Places `value` at `net`; a later, more specific insert overrides part
    /// of an earlier one. IPv4 networks in an IPv6 tree go under `::/96`.
    pub fn insert(&mut self, net: &str, value: Value) -> &mut TestDb {
        let (key, len, bits) = self.key(net);
        self.data.push(value);
        let rec = Rec::Data(self.data.len() - 1);
        self.set(key, len, bits, rec);
        self
    }

    /// Makes the IPv6 prefix `net` an alias of the IPv4 tree, as MaxMind's
    /// writer does for `::ffff:0:0/96`, `2001::/32` and `2002::/16`.
    pub fn alias(&mut self, net: &str) -> &mut TestDb {
        assert_eq!(self.ip_version, 6);
        let v4_root = self.node_at(0, 96, 128);
        let (key, len, bits) = self.key(net);
        self.set(key, len, bits, Rec::Node(v4_root));
        self
    }

    fn key(&self, net: &str) -> (u128, u32, u32) {
        let net: IpNet = net.parse().expect("test network");
        match (net.addr(), self.ip_version) {
            (IpAddr::V4(a), 4) => (u32::from(a).into(), net.prefix_len().into(), 32),
            (IpAddr::V4(a), _) => (u32::from(a).into(), u32::from(net.prefix_len()) + 96, 128),
            (IpAddr::V6(a), 6) => (a.into(), net.prefix_len().into(), 128),
            (IpAddr::V6(_), _) => panic!("IPv6 network {net} in an IPv4 database"),
        }
    }

    /// The node at `key/len`, creating it (splitting records) as needed.
    fn node_at(&mut self, key: u128, len: u32, bits: u32) -> usize {
        let mut node = 0;
        for i in 0..len {
            let bit = ((key >> (bits - 1 - i)) & 1) as usize;
            node = match self.nodes[node][bit] {
                Rec::Node(n) => n,
                other => {
                    self.nodes.push([other, other]);
                    let n = self.nodes.len() - 1;
                    self.nodes[node][bit] = Rec::Node(n);
                    n
                }
            };
        }
        node
    }

    fn set(&mut self, key: u128, len: u32, bits: u32, rec: Rec) {
        assert!(len > 0, "the root cannot hold data");
        let parent = self.node_at(key, len - 1, bits);
        let bit = ((key >> (bits - len)) & 1) as usize;
        self.nodes[parent][bit] = rec;
    }

    pub fn build(&self) -> Vec<u8> {
        let node_count = self.nodes.len();
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        for v in &self.data {
            offsets.push(data.len());
            encode(v, &mut data);
        }
        let mut out = Vec::new();
        let bytes = usize::from(self.record_size / 8);
        assert!(self.record_size == 24 || self.record_size == 32);
        for node in &self.nodes {
            for rec in node {
                let n = match *rec {
                    Rec::Empty => node_count,
                    Rec::Node(n) => n,
                    Rec::Data(i) => node_count + 16 + offsets[i],
                };
                out.extend_from_slice(&(n as u32).to_be_bytes()[4 - bytes..]);
            }
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\xab\xcd\xefMaxMind.com");
        let meta = Value::Map(vec![
            ("binary_format_major_version", Value::U16(2)),
            ("binary_format_minor_version", Value::U16(0)),
            ("build_epoch", Value::U64(self.build_epoch)),
            ("database_type", s(&self.database_type)),
            (
                "description",
                Value::Map(vec![("en", s("bulkhead test fixture"))]),
            ),
            ("ip_version", Value::U16(self.ip_version)),
            ("languages", Value::Array(vec![s("en")])),
            ("node_count", Value::U32(node_count as u32)),
            ("record_size", Value::U16(self.record_size)),
        ]);
        encode(&meta, &mut out);
        out
    }
}

fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (first, ext) = if kind <= 7 {
        (kind << 5, None)
    } else {
        (0, Some(kind - 7))
    };
    let (small, extra) = match size {
        0..29 => (size as u8, Vec::new()),
        29..285 => (29, vec![(size - 29) as u8]),
        285..65_821 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    out.push(first | small);
    out.extend(ext);
    out.extend(extra);
}

fn uint(out: &mut Vec<u8>, kind: u8, v: u64) {
    let be = v.to_be_bytes();
    let skip = be.iter().take_while(|&&b| b == 0).count();
    control(out, kind, 8 - skip);
    out.extend_from_slice(&be[skip..]);
}

fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Str(t) => {
            control(out, 2, t.len());
            out.extend_from_slice(t.as_bytes());
        }
        Value::U16(n) => uint(out, 5, (*n).into()),
        Value::U32(n) => uint(out, 6, (*n).into()),
        Value::U64(n) => uint(out, 9, *n),
        Value::Bool(b) => control(out, 14, usize::from(*b)),
        Value::Map(pairs) => {
            control(out, 7, pairs.len());
            for (k, v) in pairs {
                encode(&s(k), out);
                encode(v, out);
            }
        }
        Value::Array(items) => {
            control(out, 11, items.len());
            for v in items {
                encode(v, out);
            }
        }
    }
}
