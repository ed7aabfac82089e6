//! Address ranges as inclusive `u128` intervals (IPv4 uses the low 32 bits),
//! and what the compilers do with them: join, overlay, cut, and flatten
//! nested prefixes.

/// Addresses `start..=end`, all carrying `val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span<T> {
    pub start: u128,
    pub end: u128,
    pub val: T,
}

/// Appends `s` to a sorted list of disjoint spans, extending the last span
/// instead when the two touch and carry the same value. `s` must start after
/// the last span ends.
pub(crate) fn push<T: PartialEq>(out: &mut Vec<Span<T>>, s: Span<T>) {
    if let Some(last) = out.last_mut() {
        debug_assert!(last.end < s.start, "spans out of order");
        if last.val == s.val && last.end.checked_add(1) == Some(s.start) {
            last.end = s.end;
            return;
        }
    }
    out.push(s);
}

/// Maps every value through `f`, joining neighbours that end up equal.
pub(crate) fn map<T, U: PartialEq>(
    spans: impl IntoIterator<Item = Span<T>>,
    mut f: impl FnMut(&T) -> U,
) -> Vec<Span<U>> {
    let spans = spans.into_iter();
    let mut out = Vec::with_capacity(spans.size_hint().0);
    for s in spans {
        push(
            &mut out,
            Span {
                start: s.start,
                end: s.end,
                val: f(&s.val),
            },
        );
    }
    out
}

/// Sorted, disjoint spans of one family kept in the bytes its addresses
/// need (4 a bound for IPv4, 16 for IPv6) instead of two `u128`s and
/// padding (48 bytes a span): a country database is half a million spans,
/// held for as long as it is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed<T> {
    /// Bytes a bound: 4 or 16.
    width: usize,
    /// `start`, `end` of every span, big-endian, `width` bytes each.
    bounds: Vec<u8>,
    vals: Vec<T>,
}

impl<T: Copy + PartialEq> Packed<T> {
    /// Spans of a `bits`-bit address space (32 or 128).
    pub fn new(bits: u32) -> Packed<T> {
        Packed {
            width: bits as usize / 8,
            bounds: Vec::new(),
            vals: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.vals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }

    /// Bound `which` (0 start, 1 end) of span `i`.
    fn bound(&self, i: usize, which: usize) -> u128 {
        let at = (2 * i + which) * self.width;
        let mut b = [0u8; 16];
        b[16 - self.width..].copy_from_slice(&self.bounds[at..at + self.width]);
        u128::from_be_bytes(b)
    }

    fn put(&mut self, i: usize, which: usize, v: u128) {
        let at = (2 * i + which) * self.width;
        self.bounds[at..at + self.width].copy_from_slice(&v.to_be_bytes()[16 - self.width..]);
    }

    pub fn get(&self, i: usize) -> Span<T> {
        Span {
            start: self.bound(i, 0),
            end: self.bound(i, 1),
            val: self.vals[i],
        }
    }

    /// As [`push`]: `s` starts after the last span ends, and joins it when
    /// the two touch and carry the same value.
    ///
    /// # Panics
    /// If a bound does not fit the family's width.
    pub fn push(&mut self, s: Span<T>) {
        assert!(
            self.width == 16 || s.end >> (8 * self.width) == 0,
            "span beyond a {}-byte address",
            self.width
        );
        if let Some(last) = self.len().checked_sub(1) {
            let end = self.bound(last, 1);
            debug_assert!(end < s.start, "spans out of order");
            if self.vals[last] == s.val && end.checked_add(1) == Some(s.start) {
                self.put(last, 1, s.end);
                return;
            }
        }
        let i = self.len();
        self.bounds.resize(self.bounds.len() + 2 * self.width, 0);
        self.put(i, 0, s.start);
        self.put(i, 1, s.end);
        self.vals.push(s.val);
    }

    pub fn shrink_to_fit(&mut self) {
        self.bounds.shrink_to_fit();
        self.vals.shrink_to_fit();
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Span<T>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The value of the span holding `key`.
    pub fn find(&self, key: u128) -> Option<T> {
        // First span that does not end before `key`.
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.bound(mid, 1) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo < self.len() && self.bound(lo, 0) <= key).then(|| self.vals[lo])
    }
}

/// `top` wins where it has a value; `bottom` fills the gaps. Both inputs are
/// sorted and disjoint, and so is the result. Linear in the input sizes.
pub(crate) fn overlay<T: Copy + PartialEq>(top: &[Span<T>], bottom: &[Span<T>]) -> Vec<Span<T>> {
    let mut out = Vec::with_capacity(top.len() + bottom.len());
    let mut t = 0;
    for b in bottom {
        // First address of `b` not yet decided.
        let mut from = b.start;
        loop {
            while t < top.len() && top[t].end < from {
                push(&mut out, top[t]);
                t += 1;
            }
            match top.get(t) {
                Some(cover) if cover.start <= b.end => {
                    if cover.start > from {
                        push(
                            &mut out,
                            Span {
                                start: from,
                                end: cover.start - 1,
                                val: b.val,
                            },
                        );
                    }
                    if cover.end >= b.end {
                        break;
                    }
                    from = cover.end + 1;
                }
                _ => {
                    push(
                        &mut out,
                        Span {
                            start: from,
                            end: b.end,
                            val: b.val,
                        },
                    );
                    break;
                }
            }
        }
    }
    for s in &top[t..] {
        push(&mut out, *s);
    }
    out
}

/// Whether any span holds an address of `holes` (sorted, disjoint,
/// inclusive).
pub(crate) fn touches<T>(spans: &[Span<T>], holes: &[(u128, u128)]) -> bool {
    holes.iter().any(|&(lo, hi)| {
        let i = spans.partition_point(|s| s.end < lo);
        spans.get(i).is_some_and(|s| s.start <= hi)
    })
}

/// Removes `holes` (sorted, disjoint, inclusive) from the spans.
pub(crate) fn cut<T: Copy + PartialEq>(spans: &[Span<T>], holes: &[(u128, u128)]) -> Vec<Span<T>> {
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let mut from = s.start;
        let mut whole = true;
        for &(lo, hi) in holes {
            if hi < from || lo > s.end {
                continue;
            }
            if lo > from {
                push(
                    &mut out,
                    Span {
                        start: from,
                        end: lo - 1,
                        val: s.val,
                    },
                );
            }
            if hi >= s.end {
                whole = false;
                break;
            }
            from = hi + 1;
        }
        if whole {
            push(
                &mut out,
                Span {
                    start: from,
                    end: s.end,
                    val: s.val,
                },
            );
        }
    }
    out
}

/// Possibly nested prefixes `(first, last, prefix length, value)` →
/// disjoint spans: the most specific prefix wins, then the first given.
pub(crate) fn nested<T: Copy + PartialEq>(prefixes: &[(u128, u128, u8, T)]) -> Vec<Span<T>> {
    let mut lens: Vec<u8> = prefixes.iter().map(|p| p.2).collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    lens.dedup();
    let mut acc: Vec<Span<T>> = Vec::new();
    for len in lens {
        let mut level: Vec<Span<T>> = prefixes
            .iter()
            .filter(|p| p.2 == len)
            .map(|&(start, end, _, val)| Span { start, end, val })
            .collect();
        // Stable: the first of equal prefixes stays first.
        level.sort_by_key(|s| s.start);
        level.dedup_by_key(|s| s.start);
        acc = overlay(&acc, &level);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(start: u128, end: u128, val: u8) -> Span<u8> {
        Span { start, end, val }
    }

    #[test]
    fn geo_push_joins_touching_equal_spans() {
        let mut v = Vec::new();
        push(&mut v, sp(0, 9, 1));
        push(&mut v, sp(10, 19, 1));
        push(&mut v, sp(21, 30, 1));
        push(&mut v, sp(31, 40, 2));
        assert_eq!(v, [sp(0, 19, 1), sp(21, 30, 1), sp(31, 40, 2)]);
    }

    #[test]
    fn packed_spans_join_and_find_as_the_wide_ones() {
        for bits in [32u32, 128] {
            let top = if bits == 32 {
                u128::from(u32::MAX)
            } else {
                u128::MAX
            };
            let given = [
                sp(0, 9, 1),
                sp(10, 19, 1),
                sp(21, 30, 1),
                sp(31, 40, 2),
                sp(top - 5, top, 3),
            ];
            let (mut wide, mut packed) = (Vec::new(), Packed::new(bits));
            for s in given {
                push(&mut wide, s);
                packed.push(s);
            }
            assert_eq!(packed.iter().collect::<Vec<_>>(), wide, "{bits} bits");
            for key in [0, 9, 10, 19, 20, 21, 40, 41, top - 6, top - 5, top] {
                let i = wide.partition_point(|s| s.end < key);
                let want = wide.get(i).filter(|s| s.start <= key).map(|s| s.val);
                assert_eq!(packed.find(key), want, "{bits} bits, key {key}");
            }
        }
        assert!(Packed::<u8>::new(32).find(0).is_none());
    }

    #[test]
    #[should_panic(expected = "span beyond a 4-byte address")]
    fn packed_ipv4_spans_refuse_wider_bounds() {
        Packed::new(32).push(sp(0, 1 << 32, 1));
    }

    #[test]
    fn geo_overlay_top_wins() {
        let bottom = [sp(0, 99, 1), sp(200, 299, 2), sp(400, 499, 3)];
        let top = [
            sp(50, 59, 9),
            sp(90, 210, 8),
            sp(250, 260, 2),
            sp(300, 310, 7),
            sp(450, 600, 6),
        ];
        assert_eq!(
            overlay(&top, &bottom),
            [
                sp(0, 49, 1),
                sp(50, 59, 9),
                sp(60, 89, 1),
                sp(90, 210, 8),
                sp(211, 299, 2),
                sp(300, 310, 7),
                sp(400, 449, 3),
                sp(450, 600, 6),
            ]
        );
        assert_eq!(overlay(&[], &bottom), bottom);
        assert_eq!(overlay(&bottom, &[]), bottom);
        let all = [sp(0, u128::MAX, 1)];
        assert_eq!(overlay(&all, &bottom), all);
        assert_eq!(
            overlay(&bottom, &[sp(0, u128::MAX, 0)]),
            [
                sp(0, 99, 1),
                sp(100, 199, 0),
                sp(200, 299, 2),
                sp(300, 399, 0),
                sp(400, 499, 3),
                sp(500, u128::MAX, 0)
            ]
        );
    }

    #[test]
    fn touches_finds_spans_in_holes() {
        let spans = [sp(0, 9, 1), sp(20, 29, 1)];
        assert!(touches(&spans, &[(5, 5)]));
        assert!(touches(&spans, &[(10, 20)]));
        assert!(!touches(&spans, &[(10, 19), (30, 40)]));
        assert!(!touches::<u8>(&[], &[(0, 5)]));
    }

    #[test]
    fn geo_cut_removes_holes() {
        let holes = [(10, 19), (30, 39)];
        assert_eq!(
            cut(&[sp(0, 50, 1)], &holes),
            [sp(0, 9, 1), sp(20, 29, 1), sp(40, 50, 1)]
        );
        assert_eq!(
            cut(&[sp(12, 15, 1), sp(25, 35, 2)], &holes),
            [sp(25, 29, 2)]
        );
        assert_eq!(
            cut(&[sp(0, u128::MAX, 1)], &[(0, 5)]),
            [sp(6, u128::MAX, 1)]
        );
    }

    #[test]
    fn nested_prefixes_most_specific_first_given() {
        let p = [
            (0, 255, 24, 1),
            (16, 31, 28, 2),
            (16, 31, 28, 3),
            (20, 20, 32, 4),
            (0, 255, 24, 5),
        ];
        assert_eq!(
            nested(&p),
            [
                sp(0, 15, 1),
                sp(16, 19, 2),
                sp(20, 20, 4),
                sp(21, 31, 2),
                sp(32, 255, 1)
            ]
        );
        assert_eq!(nested::<u8>(&[]), []);
    }
}
