//! Address ranges as inclusive `u128` intervals (IPv4 uses the low 32 bits),
//! and the three operations the compiler needs: join, overlay, split into
//! CIDR prefixes.

/// Addresses `start..=end`, all carrying `val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Span<T> {
    pub start: u128,
    pub end: u128,
    pub val: T,
}

/// Appends `s` to a sorted list of disjoint spans, extending the last span
/// instead when the two touch and carry the same value. `s` must start after
/// the last span ends.
pub(super) fn push<T: PartialEq>(out: &mut Vec<Span<T>>, s: Span<T>) {
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
pub(super) fn map<T, U: PartialEq>(spans: &[Span<T>], f: impl Fn(&T) -> U) -> Vec<Span<U>> {
    let mut out = Vec::with_capacity(spans.len());
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

/// `top` wins where it has a value; `bottom` fills the gaps. Both inputs are
/// sorted and disjoint, and so is the result. Linear in the input sizes.
pub(super) fn overlay<T: Copy + PartialEq>(top: &[Span<T>], bottom: &[Span<T>]) -> Vec<Span<T>> {
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

/// Removes `holes` (sorted, disjoint, inclusive) from the spans.
pub(super) fn cut<T: Copy + PartialEq>(spans: &[Span<T>], holes: &[(u128, u128)]) -> Vec<Span<T>> {
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

/// The fewest CIDR prefixes covering exactly `start..=end` in a space of
/// `bits`-bit addresses, as `(network, prefix length)`, in address order.
pub(super) fn prefixes(start: u128, end: u128, bits: u32, out: &mut Vec<(u128, u8)>) {
    let mut s = start;
    loop {
        // Largest block that starts at `s` (alignment) and ends by `end`.
        let align = if s == 0 {
            bits
        } else {
            s.trailing_zeros().min(bits)
        };
        let fit = match (end - s).checked_add(1) {
            Some(count) => 127 - count.leading_zeros(),
            None => 128,
        };
        let k = align.min(fit);
        out.push((s, (bits - k) as u8));
        if k == 128 {
            return;
        }
        let last = s + ((1u128 << k) - 1);
        if last >= end {
            return;
        }
        s = last + 1;
    }
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
    fn geo_prefixes_are_minimal() {
        let mut v = Vec::new();
        prefixes(0, u32::MAX as u128, 32, &mut v);
        assert_eq!(v, [(0, 0)]);
        v.clear();
        prefixes(0, u128::MAX, 128, &mut v);
        assert_eq!(v, [(0, 0)]);
        v.clear();
        // 10.0.0.1 - 10.0.0.6: /32 /31 /31 /32.
        let a = 0x0a00_0000;
        prefixes(a + 1, a + 6, 32, &mut v);
        assert_eq!(v, [(a + 1, 32), (a + 2, 31), (a + 4, 31), (a + 6, 32)]);
        v.clear();
        prefixes(5, 5, 128, &mut v);
        assert_eq!(v, [(5, 128)]);
        v.clear();
        prefixes(1, u128::MAX, 128, &mut v);
        assert_eq!(v.len(), 128);
        assert_eq!(v[127], (1u128 << 127, 1));
    }
}
