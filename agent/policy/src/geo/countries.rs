//! Country codes a geofeed may use.

use crate::policy::Country;

/// The 249 officially assigned ISO 3166-1 alpha-2 codes plus `XK` (Kosovo),
/// sorted for binary search. The same set the policy accepts, so every
/// country a geofeed names can also be named in a rule.
const ASSIGNED: [Country; 250] = [
    *b"AD", *b"AE", *b"AF", *b"AG", *b"AI", *b"AL", *b"AM", *b"AO", *b"AQ", *b"AR", *b"AS", *b"AT",
    *b"AU", *b"AW", *b"AX", *b"AZ", *b"BA", *b"BB", *b"BD", *b"BE", *b"BF", *b"BG", *b"BH", *b"BI",
    *b"BJ", *b"BL", *b"BM", *b"BN", *b"BO", *b"BQ", *b"BR", *b"BS", *b"BT", *b"BV", *b"BW", *b"BY",
    *b"BZ", *b"CA", *b"CC", *b"CD", *b"CF", *b"CG", *b"CH", *b"CI", *b"CK", *b"CL", *b"CM", *b"CN",
    *b"CO", *b"CR", *b"CU", *b"CV", *b"CW", *b"CX", *b"CY", *b"CZ", *b"DE", *b"DJ", *b"DK", *b"DM",
    *b"DO", *b"DZ", *b"EC", *b"EE", *b"EG", *b"EH", *b"ER", *b"ES", *b"ET", *b"FI", *b"FJ", *b"FK",
    *b"FM", *b"FO", *b"FR", *b"GA", *b"GB", *b"GD", *b"GE", *b"GF", *b"GG", *b"GH", *b"GI", *b"GL",
    *b"GM", *b"GN", *b"GP", *b"GQ", *b"GR", *b"GS", *b"GT", *b"GU", *b"GW", *b"GY", *b"HK", *b"HM",
    *b"HN", *b"HR", *b"HT", *b"HU", *b"ID", *b"IE", *b"IL", *b"IM", *b"IN", *b"IO", *b"IQ", *b"IR",
    *b"IS", *b"IT", *b"JE", *b"JM", *b"JO", *b"JP", *b"KE", *b"KG", *b"KH", *b"KI", *b"KM", *b"KN",
    *b"KP", *b"KR", *b"KW", *b"KY", *b"KZ", *b"LA", *b"LB", *b"LC", *b"LI", *b"LK", *b"LR", *b"LS",
    *b"LT", *b"LU", *b"LV", *b"LY", *b"MA", *b"MC", *b"MD", *b"ME", *b"MF", *b"MG", *b"MH", *b"MK",
    *b"ML", *b"MM", *b"MN", *b"MO", *b"MP", *b"MQ", *b"MR", *b"MS", *b"MT", *b"MU", *b"MV", *b"MW",
    *b"MX", *b"MY", *b"MZ", *b"NA", *b"NC", *b"NE", *b"NF", *b"NG", *b"NI", *b"NL", *b"NO", *b"NP",
    *b"NR", *b"NU", *b"NZ", *b"OM", *b"PA", *b"PE", *b"PF", *b"PG", *b"PH", *b"PK", *b"PL", *b"PM",
    *b"PN", *b"PR", *b"PS", *b"PT", *b"PW", *b"PY", *b"QA", *b"RE", *b"RO", *b"RS", *b"RU", *b"RW",
    *b"SA", *b"SB", *b"SC", *b"SD", *b"SE", *b"SG", *b"SH", *b"SI", *b"SJ", *b"SK", *b"SL", *b"SM",
    *b"SN", *b"SO", *b"SR", *b"SS", *b"ST", *b"SV", *b"SX", *b"SY", *b"SZ", *b"TC", *b"TD", *b"TF",
    *b"TG", *b"TH", *b"TJ", *b"TK", *b"TL", *b"TM", *b"TN", *b"TO", *b"TR", *b"TT", *b"TV", *b"TW",
    *b"TZ", *b"UA", *b"UG", *b"UM", *b"US", *b"UY", *b"UZ", *b"VA", *b"VC", *b"VE", *b"VG", *b"VI",
    *b"VN", *b"VU", *b"WF", *b"WS", *b"XK", *b"YE", *b"YT", *b"ZA", *b"ZM", *b"ZW",
];

/// `de` or `DE` → `Some(*b"DE")` if the code is assigned.
pub(super) fn parse_assigned(code: &str) -> Option<Country> {
    let c = <[u8; 2]>::try_from(code.as_bytes())
        .ok()?
        .map(|b| b.to_ascii_uppercase());
    ASSIGNED.binary_search(&c).is_ok().then_some(c)
}

/// A code as a database stores it: any two ASCII letters, upper-cased.
/// Databases may carry codes no longer assigned (e.g. `AN`); they are still
/// places, just ones a policy cannot name. Anything else places nothing.
pub(super) fn parse_any(code: &str) -> Option<Country> {
    let c = <[u8; 2]>::try_from(code.as_bytes()).ok()?;
    c.iter()
        .all(u8::is_ascii_alphabetic)
        .then(|| c.map(|b| b.to_ascii_uppercase()))
}

/// Index of a valid (upper-case letters) code in a 26 × 26 table.
pub(super) fn index(c: Country) -> usize {
    (c[0] - b'A') as usize * 26 + (c[1] - b'A') as usize
}

pub(super) const TABLE_SIZE: usize = 26 * 26;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geo_country_codes() {
        assert!(ASSIGNED.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_assigned("DE"), Some(*b"DE"));
        assert_eq!(parse_assigned("de"), Some(*b"DE"));
        assert_eq!(parse_assigned("XK"), Some(*b"XK"));
        for bad in ["EU", "AP", "UK", "ZZ", "AN", "D", "DEU", "", "1A", "É"] {
            assert_eq!(parse_assigned(bad), None, "{bad}");
        }
        assert_eq!(parse_any("an"), Some(*b"AN"));
        assert_eq!(parse_any("--"), None);
        assert_eq!(parse_any(""), None);
        assert_eq!(index(*b"AA"), 0);
        assert_eq!(index(*b"ZZ"), TABLE_SIZE - 1);
    }
}
