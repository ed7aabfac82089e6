//! RFC 8805 geofeeds: CSV lines `prefix,country,region,city,postal_code`.
//! Only the first two columns matter here. Blank lines and `#` comments are
//! allowed; an empty country means "not placed" and the line is skipped.

use std::net::IpAddr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use super::{GeoError, countries};
use crate::policy::Country;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub net: IpNet,
    pub country: Country,
}

/// Parses a whole geofeed; the first malformed line is the error.
pub(super) fn parse(path: &Path, text: &[u8]) -> Result<Vec<Entry>, GeoError> {
    let mut out = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let err = |message: String| GeoError::Geofeed {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = std::str::from_utf8(raw).map_err(|_| err("not UTF-8".into()))?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // RFC 4180 quoting is allowed; the first two fields never need commas.
        let mut fields = line.split(',').map(|f| f.trim().trim_matches('"').trim());
        let prefix = fields.next().unwrap_or_default();
        let country = fields.next().unwrap_or_default();
        let net = parse_prefix(prefix).map_err(err)?;
        if country.is_empty() {
            continue;
        }
        let country = countries::parse_assigned(country).ok_or_else(|| {
            err(format!(
                "bad country code `{country}` (not an ISO 3166-1 alpha-2 code)"
            ))
        })?;
        out.push(Entry { net, country });
    }
    Ok(out)
}

/// `192.0.2.0/24`, `2001:db8::/32`, or a bare address (a host prefix).
/// IPv4-mapped IPv6 prefixes become IPv4 ones: that is how they are decided.
fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) if s.is_empty() => return Err("missing prefix".into()),
            Err(_) => return Err(format!("bad prefix `{s}`")),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "host bits set in `{s}` (the network is {})",
            net.trunc()
        ));
    }
    if let IpNet::V6(n) = net
        && let Some(v4) = n.network().to_ipv4_mapped()
        && n.prefix_len() >= 96
    {
        return Ok(IpNet::V4(Ipv4Net::new_assert(v4, n.prefix_len() - 96)));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Entry>, GeoError> {
        parse(Path::new("/etc/feed.csv"), text.as_bytes())
    }

    fn err(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn geo_geofeed_parses_rfc8805() {
        let feed = "\u{feff}# office and cloud\n\
                    192.0.2.0/24,DE,DE-BE,Berlin,\r\n\
                    \n\
                    2001:db8::/32,fr,,,\n\
                    198.51.100.7,NL\n\
                    203.0.113.0/24,,,,\n\
                    ::ffff:100.64.0.0/106, US ,US-CA,,\n\
                    \"100.65.0.0/16\",\"CA\",\"CA-QC\",\"Montréal, QC\",\n";
        let got = parse_str(feed).unwrap();
        let want = [
            ("192.0.2.0/24", *b"DE"),
            ("2001:db8::/32", *b"FR"),
            ("198.51.100.7/32", *b"NL"),
            ("100.64.0.0/10", *b"US"),
            ("100.65.0.0/16", *b"CA"),
        ];
        assert_eq!(got.len(), want.len());
        for (e, (net, c)) in got.iter().zip(want) {
            assert_eq!((e.net, e.country), (net.parse().unwrap(), c));
        }
    }

    #[test]
    fn geo_geofeed_errors_name_file_and_line() {
        assert_eq!(
            err("# x\n10.0.0.0/8,DE\n10.0.0.0/33,DE\n"),
            "/etc/feed.csv:3: bad prefix `10.0.0.0/33`"
        );
        assert_eq!(
            err("10.0.0.1/24,DE"),
            "/etc/feed.csv:1: host bits set in `10.0.0.1/24` (the network is 10.0.0.0/24)"
        );
        assert_eq!(
            err("\n\n10.0.0.0/8,UK"),
            "/etc/feed.csv:3: bad country code `UK` (not an ISO 3166-1 alpha-2 code)"
        );
        assert_eq!(
            err("10.0.0.0/8,DEU"),
            "/etc/feed.csv:1: bad country code `DEU` (not an ISO 3166-1 alpha-2 code)"
        );
        assert_eq!(
            err("example.com,DE"),
            "/etc/feed.csv:1: bad prefix `example.com`"
        );
        assert_eq!(err(",DE"), "/etc/feed.csv:1: missing prefix");
        assert_eq!(
            err("2001:db8::1/32,DE"),
            "/etc/feed.csv:1: host bits set in `2001:db8::1/32` (the network is 2001:db8::/32)"
        );
        let bad_utf8 = parse(Path::new("/f.csv"), b"10.0.0.0/8,DE\n\xff\xfe,DE\n").unwrap_err();
        assert_eq!(bad_utf8.to_string(), "/f.csv:2: not UTF-8");
    }
}
