//! The change planner: from a change data feed to one net action per primary key.
//!
//! Rules (the order of events for a key is `(commit version, rank)`, where deletes and
//! update pre-images rank below inserts and update post-images within one version):
//! - the key's final state is its last event: an insert or post-image means "upsert this row",
//!   a delete or pre-image means "delete this key";
//! - an `update_preimage` carries the row's OLD key; when an UPDATE changed the key, the old key
//!   must go, so a pre-image is a delete that the same version's post-image (or any later
//!   change) of the same key overrides;
//! - within one version a delete and an insert of one key resolve to the insert;
//! - two inserts/post-images of one key in one version mean the source holds duplicate keys:
//!   that is a [`PlanConflict`], never a silent pick;
//! - a key whose first event in the range is an insert did not exist before the range, so
//!   its upsert is marked `expect_absent`: finding it in the target means duplicate keys.

use std::collections::HashMap;
use std::hash::Hash;

use crate::model::Version;

/// The planner's key map: every change row is hashed once or twice, and SipHash (the std
/// default) was the largest single cost of planning; aHash is several times faster and, with
/// its `runtime-rng` feature, still keyed from the OS's random numbers.
pub type KeyMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// The `_change_type` of a change data feed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// `insert`
    Insert,
    /// `delete`
    Delete,
    /// `update_preimage`: the row before an UPDATE (with its old key).
    UpdatePreimage,
    /// `update_postimage`: the row after an UPDATE.
    UpdatePostimage,
}

impl ChangeKind {
    /// Parses a Delta `_change_type` value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "insert" => Some(Self::Insert),
            "delete" => Some(Self::Delete),
            "update_preimage" => Some(Self::UpdatePreimage),
            "update_postimage" => Some(Self::UpdatePostimage),
            _ => None,
        }
    }

    /// Whether the key exists after this event.
    pub fn leaves_row(self) -> bool {
        matches!(self, Self::Insert | Self::UpdatePostimage)
    }
}

/// Two row images of one key in one version: the source table has duplicate keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConflict<K> {
    /// The duplicated key.
    pub key: K,
    /// The version that holds both rows.
    pub version: Version,
}

#[derive(Debug, Clone)]
struct Entry<R> {
    first: (Version, bool),
    first_kind: ChangeKind,
    last: (Version, bool),
    last_kind: ChangeKind,
    /// The winning image's tie-break (see [`ChangePlanner::observe_ordered`]).
    last_order: Box<[u8]>,
    row: R,
}

/// Accumulates change rows (in any order) and reduces them to a [`ChangePlan`].
///
/// `K` is the encoded primary key; `R` is a handle to the row (for example a batch and row
/// index), kept only for the winning event.
#[derive(Debug)]
pub struct ChangePlanner<K, R> {
    entries: KeyMap<K, Entry<R>>,
}

impl<K, R> Default for ChangePlanner<K, R> {
    fn default() -> Self {
        Self { entries: KeyMap::default() }
    }
}

/// One row to upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRow<K, R> {
    /// The row's key.
    pub key: K,
    /// The handle of the row image to write.
    pub row: R,
    /// The key did not exist before the planned range (its first event is an insert).
    pub expect_absent: bool,
    /// Version of the change that produced this image.
    pub version: Version,
    /// Its tie-break among images of the key in that version (empty without one).
    pub order: Box<[u8]>,
}

/// The net effect of a range of changes. From a [`ChangePlanner`]: at most one action per
/// key, deletes with an empty order. From a [`LogPlanner`]: per key at most one delete and one
/// upsert, both guarded by their order, the delete applied first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePlan<K, R> {
    /// Rows to insert or update (under a [`LogPlanner`]: where the key is absent or holds a
    /// row whose order is not greater).
    pub upserts: Vec<PlannedRow<K, R>>,
    /// Keys to delete (under a [`LogPlanner`]: where the key's row has an order not greater
    /// than the delete's).
    pub deletes: Vec<PlannedDelete<K>>,
}

/// A key to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDelete<K> {
    pub key: K,
    /// Version of the deleting change.
    pub version: Version,
    /// From a [`LogPlanner`], the greatest order among the key's deleted rows from before the
    /// range; empty from a [`ChangePlanner`].
    pub order: Box<[u8]>,
}

impl<K: Eq + Hash + Clone, R> ChangePlanner<K, R> {
    /// An empty planner.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of distinct keys seen so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no change was observed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records one change row.
    pub fn observe(&mut self, key: K, version: Version, kind: ChangeKind, row: R) -> Result<(), PlanConflict<K>> {
        self.observe_ordered(key, version, kind, &[], row)
    }

    /// Records one change row with a tie-break for row images of one key in one version: the
    /// image with the greatest `order` (compared as bytes, e.g. an Arrow row encoding of a
    /// `dedup_by` column) wins. Two images with equal tie-breaks are still a conflict: which
    /// one is the key's state is unknowable.
    pub fn observe_ordered(
        &mut self,
        key: K,
        version: Version,
        kind: ChangeKind,
        order: &[u8],
        row: R,
    ) -> Result<(), PlanConflict<K>> {
        let at = (version, kind.leaves_row());
        match self.entries.get_mut(&key) {
            None => {
                let last_order = order.into();
                self.entries
                    .insert(key, Entry { first: at, first_kind: kind, last: at, last_kind: kind, last_order, row });
            }
            Some(e) => {
                if at == e.last && kind.leaves_row() && *order == *e.last_order {
                    return Err(PlanConflict { key, version });
                }
                if at < e.first {
                    e.first = at;
                    e.first_kind = kind;
                }
                if (at, order) > (e.last, &*e.last_order) {
                    e.last = at;
                    e.last_kind = kind;
                    e.last_order = order.into();
                    e.row = row;
                }
            }
        }
        Ok(())
    }

    /// The net plan.
    pub fn finish(self) -> ChangePlan<K, R> {
        let mut plan = ChangePlan { upserts: Vec::new(), deletes: Vec::new() };
        for (key, e) in self.entries {
            if e.last_kind.leaves_row() {
                plan.upserts.push(PlannedRow {
                    key,
                    row: e.row,
                    expect_absent: e.first_kind == ChangeKind::Insert,
                    version: e.last.0,
                    order: e.last_order,
                });
            } else {
                plan.deletes.push(PlannedDelete { key, version: e.last.0, order: Box::default() });
            }
        }
        plan
    }
}

/// The planner for a source that repeats keys, such as an append-only event log synced with
/// the `dedup_by` policy: a key's row is its row image with the greatest order (the `dedup_by`
/// value, compared as bytes), whichever commit wrote it, as in a snapshot.
///
/// The target holds, per key, the greatest of the key's rows at the range's start. Per key,
/// the range's events are replayed in `(version, rank)` order: an insert or post-image adds an
/// image; a delete or pre-image takes out an equal image the range added earlier, or else a
/// row from before the range. The plan holds the greatest image still standing (an upsert
/// that replaces only a row whose order is not greater) and the greatest deleted row from
/// before the range (a delete that removes only a row whose order is not greater: since the
/// target holds the key's greatest row, only that row's own deletion removes it).
///
/// One case is beyond any change feed: when the range deletes a key's greatest row while
/// older rows of the key from before the range remain, the next greatest is not in the feed.
/// The key then holds the range's greatest standing image, or nothing, until a snapshot.
///
/// Memory and time: per key the planner keeps its [`LogPlanner::KEEP`] greatest images and
/// every delete (an event log appends; deletes are rare), so a key with 200k events costs
/// what one with four does, and each event costs O(`KEEP`). The images it let go can matter
/// only when the range's deletes take out every kept image down to them: such a key is
/// reported [`LogPlan::uncertain`], and the caller plans it again from a second read with
/// [`LogPlanner::only`], which keeps all of those keys' images.
#[derive(Debug)]
pub struct LogPlanner<K, R> {
    entries: KeyMap<K, LogKey<R>>,
    /// How many images a key keeps (`usize::MAX`: all).
    keep: usize,
    /// Only these keys are observed (a second read for uncertain keys).
    only: Option<std::collections::HashSet<K, ahash::RandomState>>,
}

/// Images a [`LogPlanner`] keeps per key.
const LOG_KEEP: usize = 4;

/// One key's events, as far as the plan needs them.
#[derive(Debug)]
struct LogKey<R> {
    /// The greatest images by `(order, version)`, ascending.
    kept: Vec<(Box<[u8]>, Version, R)>,
    /// The greatest `(order, version)` let go, if any was.
    dropped: Option<(Box<[u8]>, Version)>,
    /// Deletes and pre-images: `(version, order)`.
    deletes: Vec<(Version, Box<[u8]>)>,
}

impl<R> Default for LogKey<R> {
    fn default() -> Self {
        Self { kept: Vec::new(), dropped: None, deletes: Vec::new() }
    }
}

/// A [`LogPlanner`]'s plan, and the keys it could not plan from the images it kept.
#[derive(Debug)]
pub struct LogPlan<K, R> {
    pub plan: ChangePlan<K, R>,
    /// Keys whose plan depends on images the planner let go; plan them again with
    /// [`LogPlanner::only`] and [`LogPlan::replace`].
    pub uncertain: Vec<K>,
}

impl<K: Eq + Hash, R> LogPlan<K, R> {
    /// This plan with `exact`'s entries for the keys `exact` planned (its uncertain ones).
    pub fn replace(mut self, exact: ChangePlan<K, R>) -> ChangePlan<K, R> {
        let keys: std::collections::HashSet<&K, ahash::RandomState> =
            exact.upserts.iter().map(|r| &r.key).chain(exact.deletes.iter().map(|d| &d.key)).collect();
        let redone: std::collections::HashSet<&K, ahash::RandomState> = self.uncertain.iter().collect();
        debug_assert!(keys.iter().all(|k| redone.contains(k)));
        self.plan.upserts.retain(|r| !redone.contains(&r.key));
        self.plan.deletes.retain(|d| !redone.contains(&d.key));
        drop(keys);
        let mut plan = self.plan;
        plan.upserts.extend(exact.upserts);
        plan.deletes.extend(exact.deletes);
        plan
    }
}

impl<K, R> Default for LogPlanner<K, R> {
    fn default() -> Self {
        Self { entries: KeyMap::default(), keep: LOG_KEEP, only: None }
    }
}

impl<K: Eq + Hash + Clone, R> LogPlanner<K, R> {
    /// Images kept per key.
    pub const KEEP: usize = LOG_KEEP;

    pub fn new() -> Self {
        Self::default()
    }

    /// A planner that observes only `keys` and keeps all their images: the second read for a
    /// plan's [`LogPlan::uncertain`] keys.
    pub fn only(keys: impl IntoIterator<Item = K>) -> Self {
        Self { entries: KeyMap::default(), keep: usize::MAX, only: Some(keys.into_iter().collect()) }
    }

    /// Images held over all keys (what memory the planner takes).
    pub fn held(&self) -> usize {
        self.entries.values().map(|e| e.kept.len() + e.deletes.len()).sum()
    }

    /// Records one change row with its order. Two images of one key in one version with equal
    /// orders are a conflict: which one is the key's row is unknowable.
    pub fn observe(
        &mut self,
        key: K,
        version: Version,
        kind: ChangeKind,
        order: &[u8],
        row: R,
    ) -> Result<(), PlanConflict<K>> {
        if self.only.as_ref().is_some_and(|only| !only.contains(&key)) {
            return Ok(());
        }
        let keep = self.keep;
        let entry = self.entries.entry(key.clone()).or_default();
        if !kind.leaves_row() {
            entry.deletes.push((version, order.into()));
            return Ok(());
        }
        // Kept images ascend by (order, version): find this one's place.
        let at = entry.kept.partition_point(|(o, v, _)| (&**o, *v) < (order, version));
        if entry.kept.get(at).is_some_and(|(o, v, _)| **o == *order && *v == version) {
            return Err(PlanConflict { key, version });
        }
        if entry.kept.len() >= keep {
            if at == 0 {
                // Below every kept image: let go.
                if entry.dropped.as_ref().is_none_or(|(o, v)| (&**o, *v) < (order, version)) {
                    entry.dropped = Some((order.into(), version));
                }
                return Ok(());
            }
            let (o, v, _) = entry.kept.remove(0);
            if entry.dropped.as_ref().is_none_or(|(d, dv)| (&**d, *dv) < (&*o, v)) {
                entry.dropped = Some((o, v));
            }
            entry.kept.insert(at - 1, (order.into(), version, row));
        } else {
            entry.kept.insert(at, (order.into(), version, row));
        }
        Ok(())
    }

    /// The net plan, with the keys it could not plan from the images it kept.
    pub fn finish(self) -> LogPlan<K, R> {
        let mut plan = ChangePlan { upserts: Vec::new(), deletes: Vec::new() };
        let mut uncertain = Vec::new();
        for (key, entry) in self.entries {
            let LogKey { kept, dropped, mut deletes } = entry;
            // Replay in (version, rank) order: within a version, deletes first.
            deletes.sort();
            let mut inserts: Vec<(Box<[u8]>, Version, R)> = kept;
            inserts.sort_by_key(|(_, v, _)| *v);
            // Standing images by order, each order's images in version order.
            let mut standing: std::collections::BTreeMap<Box<[u8]>, std::collections::VecDeque<(Version, R)>> =
                std::collections::BTreeMap::new();
            let mut deleted_before: Option<(Box<[u8]>, Version)> = None;
            let mut ins = inserts.into_iter().peekable();
            let mut any_delete_at_or_above_dropped = false;
            for (dv, order) in deletes {
                while let Some((_, v, _)) = ins.peek() {
                    if *v >= dv {
                        break;
                    }
                    let (o, v, r) = ins.next().expect("peeked");
                    standing.entry(o).or_default().push_back((v, r));
                }
                if dropped.as_ref().is_some_and(|(d, _)| order >= *d) {
                    any_delete_at_or_above_dropped = true;
                }
                let matched = match standing.get_mut(&order) {
                    Some(images) => {
                        images.pop_front();
                        if images.is_empty() {
                            standing.remove(&order);
                        }
                        true
                    }
                    None => false,
                };
                if !matched && deleted_before.as_ref().is_none_or(|(o, _)| order >= *o) {
                    deleted_before = Some((order, dv));
                }
            }
            for (o, v, r) in ins {
                standing.entry(o).or_default().push_back((v, r));
            }
            let best =
                standing.pop_last().and_then(|(order, mut images)| images.pop_back().map(|(v, r)| (order, v, r)));
            if let Some((dropped_order, _)) = &dropped {
                // Exact unless the deletes reached down to the images let go and took out
                // every kept image above them.
                let above = best.as_ref().is_some_and(|(o, _, _)| o > dropped_order);
                if any_delete_at_or_above_dropped && !above {
                    uncertain.push(key);
                    continue;
                }
            }
            if let Some((order, version)) = deleted_before {
                plan.deletes.push(PlannedDelete { key: key.clone(), version, order });
            }
            if let Some((order, version, row)) = best {
                plan.upserts.push(PlannedRow { key, row, expect_absent: false, version, order });
            }
        }
        LogPlan { plan, uncertain }
    }
}

#[cfg(test)]
mod tests {
    use super::ChangeKind::*;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn plan(events: &[(u32, u64, ChangeKind, &'static str)]) -> (BTreeMap<u32, &'static str>, Vec<u32>) {
        let mut p = ChangePlanner::new();
        for &(k, v, kind, row) in events {
            p.observe(k, v, kind, row).unwrap();
        }
        let plan = p.finish();
        let ups = plan.upserts.into_iter().map(|r| (r.key, r.row)).collect();
        let mut dels: Vec<u32> = plan.deletes.into_iter().map(|d| d.key).collect();
        dels.sort();
        (ups, dels)
    }

    #[test]
    fn a_delete_and_an_insert_in_one_version_resolve_to_the_insert() {
        let (ups, dels) = plan(&[(1, 5, Insert, "new"), (1, 5, Delete, "old")]);
        assert_eq!(ups, BTreeMap::from([(1, "new")]));
        assert!(dels.is_empty());
    }

    #[test]
    fn a_preimage_of_a_changed_key_deletes_the_old_key() {
        // UPDATE t SET id = 2 WHERE id = 1
        let (ups, dels) = plan(&[(1, 3, UpdatePreimage, "id=1"), (2, 3, UpdatePostimage, "id=2")]);
        assert_eq!(ups, BTreeMap::from([(2, "id=2")]));
        assert_eq!(dels, vec![1]);
    }

    #[test]
    fn a_preimage_is_overridden_by_the_postimage_of_the_same_key() {
        let (ups, dels) = plan(&[(1, 3, UpdatePostimage, "after"), (1, 3, UpdatePreimage, "before")]);
        assert_eq!(ups, BTreeMap::from([(1, "after")]));
        assert!(dels.is_empty());
    }

    #[test]
    fn a_later_version_wins_whatever_the_input_order() {
        let (ups, dels) = plan(&[(1, 4, Delete, "x"), (1, 2, Insert, "a"), (1, 3, UpdatePostimage, "b")]);
        assert!(ups.is_empty());
        assert_eq!(dels, vec![1]);
    }

    #[test]
    fn images_of_one_key_in_one_version_are_ordered_by_their_tie_break() {
        let mut p: ChangePlanner<u32, &str> = ChangePlanner::new();
        p.observe_ordered(1, 3, Insert, b"b", "second").unwrap();
        p.observe_ordered(1, 3, Insert, b"c", "third").unwrap();
        p.observe_ordered(1, 3, Insert, b"a", "first").unwrap();
        p.observe_ordered(2, 3, Insert, b"x", "x").unwrap();
        assert_eq!(p.observe_ordered(2, 3, Insert, b"x", "again"), Err(PlanConflict { key: 2, version: 3 }));
        // A later version wins whatever its tie-break.
        p.observe_ordered(1, 4, UpdatePostimage, b"", "later").unwrap();
        let plan = p.finish();
        let rows: BTreeMap<u32, (&str, bool)> =
            plan.upserts.iter().map(|r| (r.key, (r.row, r.expect_absent))).collect();
        assert_eq!(rows[&1], ("later", true));
        assert_eq!(rows[&2], ("x", true));
    }

    #[test]
    fn two_inserts_of_one_key_in_one_version_are_a_conflict() {
        let mut p = ChangePlanner::new();
        p.observe(7, 1, Insert, ()).unwrap();
        assert_eq!(p.observe(7, 1, Insert, ()), Err(PlanConflict { key: 7, version: 1 }));
    }

    #[test]
    fn an_upsert_expects_absence_only_when_the_range_starts_with_an_insert() {
        let mut p = ChangePlanner::new();
        p.observe(1, 1, Insert, ()).unwrap();
        p.observe(1, 2, UpdatePreimage, ()).unwrap();
        p.observe(1, 2, UpdatePostimage, ()).unwrap();
        p.observe(2, 1, Delete, ()).unwrap();
        p.observe(2, 1, Insert, ()).unwrap();
        let mut ups = p.finish().upserts;
        ups.sort_by_key(|r| r.key);
        assert_eq!(ups.iter().map(|r| (r.key, r.expect_absent)).collect::<Vec<_>>(), vec![(1, true), (2, false)]);
    }

    /// One generated commit: a set of operations on a small key space, turned into the change
    /// rows a Delta writer would emit for it.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16),
        Update(u8, u16),
        Delete(u8),
        /// UPDATE that moves a row from one key to another.
        Rekey(u8, u8),
        /// Copy-on-write rewrite without cdc files: every row is deleted and re-inserted.
        Rewrite,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (0u8..12, any::<u16>()).prop_map(|(k, v)| Op::Update(k, v)),
            (0u8..12).prop_map(Op::Delete),
            (0u8..12, 0u8..12).prop_map(|(a, b)| Op::Rekey(a, b)),
            Just(Op::Rewrite),
        ]
    }

    /// Shuffles a feed deterministically from `seed` (Fisher-Yates with an LCG).
    fn shuffle<T>(feed: &mut [T], seed: u64) {
        let mut rng = seed;
        for i in (1..feed.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            feed.swap(i, (rng >> 33) as usize % (i + 1));
        }
    }

    /// Versions `1..=last` split after `split` into two consecutive ranges, the empty ones left out.
    fn two_ranges(last: u64, split: u64) -> impl Iterator<Item = (u64, u64)> {
        let mid = split.min(last);
        [(1, mid), (mid + 1, last)].into_iter().filter(|(lo, hi)| lo <= hi)
    }

    proptest! {
        /// Model-based test: applying the plan of any change sequence to the table as it was
        /// before gives exactly the table after, for every split into two consecutive ranges.
        #[test]
        fn the_plan_of_a_change_feed_reproduces_the_table(
            commits in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..12),
            split in 0usize..12,
            shuffle_seed in any::<u64>(),
        ) {
            // The model: the table itself, key -> value, one commit at a time.
            let mut table: BTreeMap<u8, u16> = BTreeMap::new();
            let mut history = vec![table.clone()];
            let mut feed: Vec<(u8, u64, ChangeKind, u16)> = Vec::new();
            for (i, ops) in commits.iter().enumerate() {
                let v = i as u64 + 1;
                // One commit applies its operations in order; the feed records net per-row images
                // of that commit, like Delta does for one operation.
                let before = table.clone();
                for op in ops {
                    match *op {
                        Op::Insert(k, x) => { table.entry(k).or_insert(x); }
                        Op::Update(k, x) => { if let Some(val) = table.get_mut(&k) { *val = x; } }
                        Op::Delete(k) => { table.remove(&k); }
                        Op::Rekey(a, b) => {
                            if a != b && !table.contains_key(&b) {
                                if let Some(x) = table.remove(&a) { table.insert(b, x); }
                            }
                        }
                        Op::Rewrite => {}
                    }
                }
                let rewrite = ops.iter().any(|o| matches!(o, Op::Rewrite));
                for (k, x) in &before {
                    match table.get(k) {
                        None => feed.push((*k, v, if rewrite { Delete } else { UpdatePreimage }, *x)),
                        Some(y) if rewrite => { feed.push((*k, v, Delete, *x)); let _ = y; }
                        Some(y) if y != x => feed.push((*k, v, UpdatePreimage, *x)),
                        Some(_) => {}
                    }
                }
                for (k, y) in &table {
                    match before.get(k) {
                        None => feed.push((*k, v, Insert, *y)),
                        Some(_) if rewrite => feed.push((*k, v, Insert, *y)),
                        Some(x) if x != y => feed.push((*k, v, UpdatePostimage, *y)),
                        Some(_) => {}
                    }
                }
                history.push(table.clone());
            }
            // Feed order within a range is arbitrary (files are read in any order).
            shuffle(&mut feed, shuffle_seed);
            let mut pg = BTreeMap::new();
            for (lo, hi) in two_ranges(commits.len() as u64, split as u64) {
                let mut planner = ChangePlanner::new();
                for &(k, v, kind, x) in feed.iter().filter(|e| (lo..=hi).contains(&e.1)) {
                    planner.observe(k, v, kind, x).unwrap();
                }
                let plan = planner.finish();
                for d in plan.deletes { pg.remove(&d.key); }
                for r in plan.upserts {
                    if r.expect_absent {
                        prop_assert!(!pg.contains_key(&r.key), "key {} marked absent but present", r.key);
                    }
                    pg.insert(r.key, r.row);
                }
                prop_assert_eq!(&pg, &history[hi as usize]);
            }
        }
    }

    /// What happens to an event log in one commit.
    #[derive(Debug, Clone)]
    enum LogOp {
        /// An event of key `.0` with order `.1` and value `.2` is appended.
        Append(u8, u8, u16),
        /// Every row of a key is deleted (a user's data erased).
        DeleteKey(u8),
        /// Every row of a key but its greatest is deleted (retention of old events).
        DeleteOlder(u8),
        /// The value of a key's greatest row is updated in place (same order).
        UpdateGreatest(u8, u16),
    }

    fn log_op() -> impl Strategy<Value = LogOp> {
        prop_oneof![
            4 => (0u8..6, any::<u8>(), any::<u16>()).prop_map(|(k, o, v)| LogOp::Append(k, o, v)),
            1 => (0u8..6).prop_map(LogOp::DeleteKey),
            1 => (0u8..6).prop_map(LogOp::DeleteOlder),
            1 => (0u8..6, any::<u16>()).prop_map(|(k, v)| LogOp::UpdateGreatest(k, v)),
        ]
    }

    #[test]
    fn a_late_event_does_not_replace_a_greater_one_from_an_earlier_commit() {
        let mut p = LogPlanner::new();
        p.observe(1u32, 2, Insert, &[3], "late").unwrap();
        let plan = p.finish().plan;
        assert_eq!(plan.upserts.len(), 1);
        assert_eq!(*plan.upserts[0].order, [3], "written only over a row whose order is not greater");
        let mut p = LogPlanner::new();
        p.observe(1u32, 1, Insert, &[7], "new").unwrap();
        p.observe(1u32, 2, Insert, &[3], "late").unwrap();
        assert_eq!(p.finish().plan.upserts[0].row, "new");
    }

    #[test]
    fn deleting_an_older_event_keeps_the_greater_one_standing() {
        let mut p = LogPlanner::new();
        p.observe(1u32, 1, Insert, &[3], "old").unwrap();
        p.observe(1u32, 1, Insert, &[7], "new").unwrap();
        p.observe(1u32, 2, Delete, &[3], "old").unwrap();
        let plan = p.finish().plan;
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.upserts[0].row, "new");
        // A row from before the range: a delete guarded by its order, so a greater row stays.
        let mut p = LogPlanner::<u32, &str>::new();
        p.observe(1, 2, Delete, &[3], "old").unwrap();
        let plan = p.finish().plan;
        assert_eq!((plan.deletes.len(), &*plan.deletes[0].order), (1, &[3u8][..]));
    }

    #[test]
    fn a_key_with_200k_events_keeps_four_images_and_plans_its_greatest() {
        let mut p = LogPlanner::new();
        // A log appending one key's events in commits of 1000, orders not in commit order.
        for i in 0..200_000u64 {
            let order = ((i * 7919) % 200_000).to_be_bytes();
            p.observe(1u32, i / 1000, Insert, &order, i).unwrap();
        }
        assert_eq!(p.held(), LogPlanner::<u32, u64>::KEEP);
        let plan = p.finish();
        assert!(plan.uncertain.is_empty());
        let best = &plan.plan.upserts[0];
        assert_eq!(*best.order, 199_999u64.to_be_bytes());
        assert_eq!(best.row, (0..200_000u64).find(|i| (i * 7919) % 200_000 == 199_999).unwrap());
    }

    #[test]
    fn deletes_reaching_below_the_kept_images_make_the_key_uncertain_and_a_second_read_plans_it() {
        let events: Vec<(u64, ChangeKind, u8)> = (0..10u8)
            .map(|o| (1, Insert, o))
            // Version 2 deletes the eight greatest: the key's row is order 1, which was let go.
            .chain((2..10u8).map(|o| (2, Delete, o)))
            .collect();
        let mut p = LogPlanner::new();
        for &(v, kind, o) in &events {
            p.observe(7u32, v, kind, &[o], o).unwrap();
        }
        p.observe(8u32, 1, Insert, &[1], 1).unwrap();
        let first = p.finish();
        assert_eq!(first.uncertain, vec![7]);
        let mut again = LogPlanner::only(first.uncertain.clone());
        for &(v, kind, o) in &events {
            again.observe(7u32, v, kind, &[o], o).unwrap();
        }
        again.observe(8u32, 1, Insert, &[1], 1).unwrap();
        let plan = first.replace(again.finish().plan);
        let rows: BTreeMap<u32, u8> = plan.upserts.iter().map(|r| (r.key, r.row)).collect();
        assert_eq!(rows, BTreeMap::from([(7, 1), (8, 1)]));
        assert!(plan.deletes.is_empty());
    }

    proptest! {
        /// Model-based test: the source is a multiset of rows per key, the target holds each
        /// key's greatest; applying each range's plan with its guards gives exactly the greatest
        /// row of every key after the range, for every split into two consecutive ranges.
        #[test]
        fn the_plan_of_an_event_log_keeps_each_keys_greatest_row(
            commits in proptest::collection::vec(proptest::collection::vec(log_op(), 1..4), 1..12),
            split in 0usize..12,
            shuffle_seed in any::<u64>(),
        ) {
            let mut source: BTreeMap<u8, BTreeMap<u8, u16>> = BTreeMap::new();
            let greatest = |s: &BTreeMap<u8, BTreeMap<u8, u16>>| -> BTreeMap<u8, (u8, u16)> {
                s.iter().filter_map(|(k, rows)| rows.iter().next_back().map(|(o, v)| (*k, (*o, *v)))).collect()
            };
            let mut history = vec![greatest(&source)];
            let mut feed: Vec<(u8, u64, ChangeKind, u8, u16)> = Vec::new();
            for (i, ops) in commits.iter().enumerate() {
                let v = i as u64 + 1;
                let before = source.clone();
                for op in ops {
                    match *op {
                        // Orders are unique per key (a sequence number), as dedup_by needs.
                        LogOp::Append(k, o, x) => { source.entry(k).or_default().entry(o).or_insert(x); }
                        LogOp::DeleteKey(k) => { source.remove(&k); }
                        LogOp::DeleteOlder(k) => {
                            if let Some(rows) = source.get_mut(&k) {
                                let top = rows.keys().next_back().copied();
                                rows.retain(|o, _| Some(*o) == top);
                            }
                        }
                        LogOp::UpdateGreatest(k, x) => {
                            if let Some((_, val)) = source.get_mut(&k).and_then(|r| r.iter_mut().next_back()) { *val = x; }
                        }
                    }
                }
                source.retain(|_, rows| !rows.is_empty());
                // The commit's net row images, as Delta records them.
                let keys: std::collections::BTreeSet<u8> = before.keys().chain(source.keys()).copied().collect();
                for k in keys {
                    let (old, new) = (before.get(&k).cloned().unwrap_or_default(), source.get(&k).cloned().unwrap_or_default());
                    for (o, x) in &old {
                        match new.get(o) {
                            None => feed.push((k, v, Delete, *o, *x)),
                            Some(y) if y != x => feed.push((k, v, UpdatePreimage, *o, *x)),
                            Some(_) => {}
                        }
                    }
                    for (o, y) in &new {
                        match old.get(o) {
                            None => feed.push((k, v, Insert, *o, *y)),
                            Some(x) if x != y => feed.push((k, v, UpdatePostimage, *o, *y)),
                            Some(_) => {}
                        }
                    }
                }
                history.push(greatest(&source));
            }
            shuffle(&mut feed, shuffle_seed);
            let mut pg: BTreeMap<u8, (u8, u16)> = BTreeMap::new();
            for (lo, hi) in two_ranges(commits.len() as u64, split as u64) {
                let range = || feed.iter().filter(|e| (lo..=hi).contains(&e.1));
                let mut planner = LogPlanner::new();
                for &(k, v, kind, o, x) in range() {
                    planner.observe(k, v, kind, &[o], (o, x)).unwrap();
                }
                let first = planner.finish();
                // Keys the kept images cannot decide: a second read plans them.
                let mut again = LogPlanner::only(first.uncertain.clone());
                for &(k, v, kind, o, x) in range() {
                    again.observe(k, v, kind, &[o], (o, x)).unwrap();
                }
                let plan = first.replace(again.finish().plan);
                for d in plan.deletes {
                    if pg.get(&d.key).is_some_and(|(o, _)| *o <= d.order[0]) { pg.remove(&d.key); }
                }
                for r in plan.upserts {
                    if pg.get(&r.key).is_none_or(|(o, _)| *o <= r.order[0]) { pg.insert(r.key, r.row); }
                }
                prop_assert_eq!(&pg, &history[hi as usize]);
            }
        }
    }
}
