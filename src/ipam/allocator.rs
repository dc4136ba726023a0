//! The pure allocator: which address to hand out next, given a pool and the addresses in use.
//! No I/O, no clock, no randomness of its own (the caller passes a random source).
//!
//! Addresses are offsets (`u128`; an IPv4 address is its 32-bit value). A [`Pool`] is the set of
//! addresses a range set may hand out: its ranges minus the reserved addresses (network,
//! broadcast, gateways) and the excluded blocks, kept as a short sorted list of disjoint
//! intervals. The addresses in use are a sorted slice. Everything below is rank/select over
//! that slice with binary searches, so one allocation costs O(k log n) for k intervals (a
//! handful, from the config) and n addresses in use, and memory never depends on the size of
//! the range: an IPv6 /64 with random allocation works like a /24.

/// How the next address is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The first free address after the last one handed out, wrapping around at the end; an
    /// address just released is not reused before the cursor comes round again.
    Sequential,
    /// A uniformly random free address.
    Random,
    /// The lowest free address.
    Dense,
}

impl Strategy {
    /// Parses the config spelling; "dense-pack" and "dense_pack" are accepted for dense.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "sequential" => Self::Sequential,
            "random" => Self::Random,
            "dense" | "dense-pack" | "dense_pack" => Self::Dense,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::Dense => "dense",
        }
    }
}

/// An inclusive interval of offsets, `lo <= hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub lo: u128,
    pub hi: u128,
}

impl Interval {
    pub fn new(lo: u128, hi: u128) -> Self {
        Self { lo, hi }
    }

    /// Number of addresses in the interval. `u128` suffices because no pool can contain
    /// offset 0 and every other address at once (a network address is always reserved); the
    /// saturation only matters for an interval that a caller built by hand.
    pub fn size(&self) -> u128 {
        (self.hi - self.lo).saturating_add(1)
    }

    pub fn contains(&self, x: u128) -> bool {
        self.lo <= x && x <= self.hi
    }
}

/// The addresses one range set may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Sorted, disjoint, non-adjacent, never empty individually.
    intervals: Vec<Interval>,
}

impl Pool {
    /// The union of `spans` minus the union of `holes`.
    pub fn new(spans: &[Interval], holes: &[Interval]) -> Self {
        let spans = merge(spans);
        let holes = merge(holes);
        let mut intervals = Vec::with_capacity(spans.len() + holes.len());
        for span in spans {
            let mut lo = span.lo;
            let mut open = true;
            for hole in holes.iter().filter(|h| h.hi >= span.lo && h.lo <= span.hi) {
                if hole.lo > lo {
                    intervals.push(Interval::new(lo, hole.lo - 1));
                }
                match hole.hi.checked_add(1) {
                    Some(next) if next <= span.hi => lo = lo.max(next),
                    _ => {
                        open = false;
                        break;
                    }
                }
            }
            if open && lo <= span.hi {
                intervals.push(Interval::new(lo, span.hi));
            }
        }
        Self { intervals }
    }

    pub fn intervals(&self) -> &[Interval] {
        &self.intervals
    }

    /// Number of addresses the pool can hand out when nothing is in use.
    pub fn capacity(&self) -> u128 {
        self.intervals.iter().fold(0u128, |acc, i| acc.saturating_add(i.size()))
    }

    pub fn contains(&self, x: u128) -> bool {
        let idx = self.intervals.partition_point(|i| i.hi < x);
        self.intervals.get(idx).is_some_and(|i| i.contains(x))
    }

    /// Number of `used` addresses (sorted, distinct) that lie in the pool.
    pub fn used_count(&self, used: &[u128]) -> u128 {
        self.intervals.iter().map(|i| used_in(used, *i).len() as u128).sum()
    }

    /// Number of addresses still free.
    pub fn free_count(&self, used: &[u128]) -> u128 {
        self.intervals.iter().map(|i| free_in(used, *i)).sum()
    }

    /// The `n`-th free address in ascending order (0-based), if there are more than `n`.
    pub fn nth_free(&self, used: &[u128], mut n: u128) -> Option<u128> {
        for interval in &self.intervals {
            let in_use = used_in(used, *interval);
            let free = interval.size() - in_use.len() as u128;
            if n < free {
                // Among the used addresses s_0 < s_1 < ... of this interval, s_i - lo - i free
                // addresses precede s_i; that is non-decreasing in i. The answer is lo + n plus
                // the number of used addresses preceded by at most n free ones.
                let (mut below, mut above) = (0usize, in_use.len());
                while below < above {
                    let mid = below + (above - below) / 2;
                    if in_use[mid] - interval.lo - mid as u128 <= n {
                        below = mid + 1;
                    } else {
                        above = mid;
                    }
                }
                return Some(interval.lo + n + below as u128);
            }
            n -= free;
        }
        None
    }

    /// Number of free addresses in the pool that are `<= x`.
    pub fn free_at_or_below(&self, used: &[u128], x: u128) -> u128 {
        let mut count = 0u128;
        for interval in &self.intervals {
            if interval.lo > x {
                break;
            }
            if interval.hi <= x {
                count += free_in(used, *interval);
            } else {
                let part = Interval::new(interval.lo, x);
                count += free_in(used, part);
                break;
            }
        }
        count
    }

    /// The address `strategy` picks, or `None` when the pool is exhausted.
    ///
    /// `cursor` is the last address handed out from this pool (sequential continues after it);
    /// `random_below(m)` must return a uniformly distributed value in `0..m` (m > 0).
    pub fn next(
        &self,
        used: &[u128],
        strategy: Strategy,
        cursor: Option<u128>,
        random_below: &mut dyn FnMut(u128) -> u128,
    ) -> Option<u128> {
        let free = self.free_count(used);
        if free == 0 {
            return None;
        }
        let n = match strategy {
            Strategy::Dense => 0,
            Strategy::Random => random_below(free) % free,
            Strategy::Sequential => match cursor {
                // Free addresses up to the cursor come later; n == free wraps to the first.
                Some(c) => self.free_at_or_below(used, c) % free,
                None => 0,
            },
        };
        self.nth_free(used, n)
    }
}

/// The part of the sorted `used` slice that lies inside `interval`.
fn used_in(used: &[u128], interval: Interval) -> &[u128] {
    let start = used.partition_point(|&u| u < interval.lo);
    let end = used.partition_point(|&u| u <= interval.hi);
    &used[start..end]
}

fn free_in(used: &[u128], interval: Interval) -> u128 {
    interval.size() - used_in(used, interval).len() as u128
}

/// Sorts intervals and merges the overlapping or adjacent ones.
fn merge(list: &[Interval]) -> Vec<Interval> {
    let mut sorted: Vec<Interval> = list.iter().copied().filter(|i| i.lo <= i.hi).collect();
    sorted.sort_by_key(|i| i.lo);
    let mut out: Vec<Interval> = Vec::with_capacity(sorted.len());
    for i in sorted {
        match out.last_mut() {
            Some(last) if last.hi == u128::MAX || i.lo <= last.hi + 1 => last.hi = last.hi.max(i.hi),
            _ => out.push(i),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn iv(lo: u128, hi: u128) -> Interval {
        Interval::new(lo, hi)
    }

    /// The obvious implementation, for comparison on small pools.
    fn naive_free(pool: &Pool, used: &BTreeSet<u128>) -> Vec<u128> {
        pool.intervals().iter().flat_map(|i| i.lo..=i.hi).filter(|a| !used.contains(a)).collect()
    }

    fn no_random(_: u128) -> u128 {
        panic!("no randomness expected")
    }

    #[test]
    fn holes_are_cut_out_of_spans() {
        let pool = Pool::new(&[iv(10, 20), iv(30, 40)], &[iv(10, 10), iv(15, 16), iv(20, 31), iv(40, 40)]);
        assert_eq!(pool.intervals(), &[iv(11, 14), iv(17, 19), iv(32, 39)]);
        assert_eq!(pool.capacity(), 4 + 3 + 8);
        assert!(pool.contains(11) && pool.contains(39) && !pool.contains(15) && !pool.contains(40));
        // A hole covering everything leaves nothing.
        assert_eq!(Pool::new(&[iv(5, 9)], &[iv(0, 100)]).capacity(), 0);
        // Holes reaching the top of the address space do not overflow.
        let top = Pool::new(&[iv(u128::MAX - 4, u128::MAX)], &[iv(u128::MAX - 1, u128::MAX)]);
        assert_eq!(top.intervals(), &[iv(u128::MAX - 4, u128::MAX - 2)]);
    }

    #[test]
    fn nth_free_skips_used_addresses() {
        let pool = Pool::new(&[iv(10, 20)], &[]);
        let used = [10, 11, 13, 20];
        assert_eq!(pool.nth_free(&used, 0), Some(12));
        assert_eq!(pool.nth_free(&used, 1), Some(14));
        assert_eq!(pool.nth_free(&used, 6), Some(19));
        assert_eq!(pool.nth_free(&used, 7), None);
        assert_eq!(pool.free_count(&used), 7);
    }

    #[test]
    fn sequential_continues_after_the_cursor_and_wraps() {
        let pool = Pool::new(&[iv(1, 5)], &[]);
        let seq = Strategy::Sequential;
        assert_eq!(pool.next(&[], seq, None, &mut no_random), Some(1));
        assert_eq!(pool.next(&[1, 2], seq, Some(2), &mut no_random), Some(3));
        // 2 was just freed: it is not reused before the cursor wraps.
        assert_eq!(pool.next(&[1, 3], seq, Some(3), &mut no_random), Some(4));
        assert_eq!(pool.next(&[1, 3, 4, 5], seq, Some(5), &mut no_random), Some(2));
        assert_eq!(pool.next(&[1, 2, 3, 4, 5], seq, Some(5), &mut no_random), None);
    }

    #[test]
    fn an_ipv6_slash_64_allocates_without_enumerating() {
        let base: u128 = 0xfd00_0000_0000_0001 << 64;
        let pool = Pool::new(&[iv(base + 1, base + u128::from(u64::MAX))], &[]);
        assert_eq!(pool.capacity(), u128::from(u64::MAX));
        let used: Vec<u128> = (1..=1000).map(|i| base + i).collect();
        assert_eq!(pool.next(&used, Strategy::Dense, None, &mut no_random), Some(base + 1001));
        let mut pick_last = |m: u128| m - 1;
        assert_eq!(pool.next(&used, Strategy::Random, None, &mut pick_last), Some(base + u128::from(u64::MAX)));
        let mut pick_middle = |m: u128| m / 2;
        let r = pool.next(&used, Strategy::Random, None, &mut pick_middle).unwrap();
        assert!(pool.contains(r) && used.binary_search(&r).is_err());
        assert_eq!(r, base + 1001 + (u128::from(u64::MAX) - 1000) / 2);
    }

    fn small_pool() -> impl proptest::strategy::Strategy<Value = (Pool, BTreeSet<u128>)> {
        (
            proptest::collection::vec((0u128..200, 0u128..30), 1..4),
            proptest::collection::vec((0u128..240, 0u128..5), 0..6),
            proptest::collection::btree_set(0u128..240, 0..120),
        )
            .prop_map(|(spans, holes, used)| {
                let spans: Vec<_> = spans.into_iter().map(|(lo, len)| iv(lo, lo + len)).collect();
                let holes: Vec<_> = holes.into_iter().map(|(lo, len)| iv(lo, lo + len)).collect();
                (Pool::new(&spans, &holes), used)
            })
    }

    use proptest::strategy::Strategy as _;

    proptest! {
        #[test]
        fn select_and_rank_match_the_naive_model((pool, used) in small_pool(), n in 0u128..300, x in 0u128..260) {
            let used_vec: Vec<u128> = used.iter().copied().collect();
            let free = naive_free(&pool, &used);
            prop_assert_eq!(pool.free_count(&used_vec), free.len() as u128);
            prop_assert_eq!(pool.nth_free(&used_vec, n), free.get(n as usize).copied());
            prop_assert_eq!(pool.free_at_or_below(&used_vec, x), free.iter().filter(|&&a| a <= x).count() as u128);
            prop_assert_eq!(pool.used_count(&used_vec), used.iter().filter(|&&u| pool.contains(u)).count() as u128);
        }

        #[test]
        fn each_strategy_picks_its_address(
            (pool, used) in small_pool(),
            cursor in proptest::option::of(0u128..260),
            r in any::<u128>(),
        ) {
            let used_vec: Vec<u128> = used.iter().copied().collect();
            let free = naive_free(&pool, &used);
            let dense = pool.next(&used_vec, Strategy::Dense, cursor, &mut no_random);
            prop_assert_eq!(dense, free.first().copied());
            let seq = pool.next(&used_vec, Strategy::Sequential, cursor, &mut no_random);
            let expected = match cursor {
                Some(c) => free.iter().find(|&&a| a > c).or(free.first()).copied(),
                None => free.first().copied(),
            };
            prop_assert_eq!(seq, expected);
            let mut source = |m: u128| r % m;
            let random = pool.next(&used_vec, Strategy::Random, cursor, &mut source);
            prop_assert_eq!(random, if free.is_empty() { None } else { Some(free[(r % free.len() as u128) as usize]) });
        }

        /// Repeated allocation and release with every strategy: never a duplicate, never an
        /// address outside the pool, exhaustion exactly when every address is taken.
        #[test]
        fn allocation_runs_never_duplicate(
            (pool, _) in small_pool(),
            ops in proptest::collection::vec((any::<bool>(), any::<u128>()), 1..300),
            which in 0usize..3,
        ) {
            let strategy = [Strategy::Sequential, Strategy::Random, Strategy::Dense][which];
            let mut used: BTreeSet<u128> = BTreeSet::new();
            let mut cursor = None;
            for (allocate, r) in ops {
                let used_vec: Vec<u128> = used.iter().copied().collect();
                if allocate || used.is_empty() {
                    let mut source = |m: u128| r % m;
                    match pool.next(&used_vec, strategy, cursor, &mut source) {
                        Some(a) => {
                            prop_assert!(pool.contains(a));
                            prop_assert!(used.insert(a), "duplicate {}", a);
                            cursor = Some(a);
                        }
                        None => prop_assert_eq!(used.len() as u128, pool.capacity()),
                    }
                } else {
                    let victim = used_vec[(r % used_vec.len() as u128) as usize];
                    used.remove(&victim);
                }
            }
        }

        /// A dual-stack pair of pools: each family only ever hands out its own addresses, and
        /// a used address of one family never blocks the other.
        #[test]
        fn families_stay_apart(v4_used in proptest::collection::btree_set(0u128..300, 0..50), v6_count in 0u128..50) {
            let v4 = Pool::new(&[iv(0x0a00_0001, 0x0a00_00fe)], &[]);
            let v6_base: u128 = 0xfd00 << 112;
            let v6 = Pool::new(&[iv(v6_base + 1, v6_base + u128::from(u64::MAX))], &[]);
            let v4_used: Vec<u128> = v4_used.into_iter().map(|o| 0x0a00_0000 + o).collect();
            let v6_used: Vec<u128> = (1..=v6_count).map(|i| v6_base + i).collect();
            let a4 = v4.next(&v4_used, Strategy::Dense, None, &mut no_random);
            let a6 = v6.next(&v6_used, Strategy::Dense, None, &mut no_random).unwrap();
            prop_assert_eq!(a6, v6_base + v6_count + 1);
            if let Some(a) = a4 {
                prop_assert!(a <= u128::from(u32::MAX) && v4.contains(a) && !v4_used.contains(&a));
            }
        }
    }
}
