//! Spreading work (synced tables, ingests) over a fleet of replicas.
//!
//! Every replica runs the same pure planner on the same view (the live replicas, every work
//! item and who holds it) and acts only for itself: it releases what it holds beyond its
//! quota and tries to claim free items up to it. Claims are advisory locks in Postgres, so two
//! replicas racing for one item cannot both win; the planner only decides who *tries*.
//!
//! Invariants:
//! - Quotas add up to the number of items and differ by at most one ([`quota`]).
//! - Once membership is stable and every replica has acted on a fresh view, every item has
//!   one holder and every replica holds exactly its quota (the property test below drives
//!   random joins, deaths and tick orders against a model of the locks).
//! - Moves are minimal: a replica never releases an item while it is within its quota, so a
//!   replica joining or leaving moves only the items that must move.

/// A stable 64-bit hash (FNV-1a): every replica must compute the same preference order,
/// whatever its build.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// How much `replica` wants `item` (rendezvous hashing): replicas prefer different items, so
/// concurrent claims rarely collide, and each replica's order is stable over time.
pub fn preference(replica: &str, item: &str) -> u64 {
    fnv1a(&[replica, item])
}

/// How many of `items` items `me` should hold among the `live` replicas: `items / n`, plus one
/// for the first `items % n` replicas in id order. `me` counts as live.
pub fn quota(me: &str, live: &[String], items: usize) -> usize {
    let mut ids: Vec<&str> = live.iter().map(String::as_str).collect();
    if !ids.contains(&me) {
        ids.push(me);
    }
    ids.sort_unstable();
    ids.dedup();
    let n = ids.len();
    let rank = ids.iter().position(|id| *id == me).expect("me is in the list");
    items / n + usize::from(rank < items % n)
}

/// What one replica should do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Moves {
    /// Items to hand over (stop, then release), least preferred first.
    pub release: Vec<String>,
    /// Free items to try, most preferred first; stop after `want` claims succeed.
    pub candidates: Vec<String>,
    /// How many more items to hold.
    pub want: usize,
}

/// The moves of replica `me`, given the `live` replicas and every item with its holder (the
/// replica id, or `None` when free).
pub fn plan(me: &str, live: &[String], items: &[(String, Option<String>)]) -> Moves {
    let quota = quota(me, live, items.len());
    let mut mine: Vec<&str> =
        items.iter().filter(|(_, owner)| owner.as_deref() == Some(me)).map(|(k, _)| k.as_str()).collect();
    let mut moves = Moves::default();
    if mine.len() > quota {
        mine.sort_by_key(|k| (preference(me, k), *k));
        moves.release = mine[..mine.len() - quota].iter().map(|k| k.to_string()).collect();
    } else if mine.len() < quota {
        let mut free: Vec<&str> = items.iter().filter(|(_, owner)| owner.is_none()).map(|(k, _)| k.as_str()).collect();
        free.sort_by_key(|k| (std::cmp::Reverse(preference(me, k)), *k));
        moves.candidates = free.into_iter().map(str::to_string).collect();
        moves.want = quota - mine.len();
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("replica-{i}")).collect()
    }

    #[test]
    fn quotas_add_up_to_the_items_and_differ_by_at_most_one() {
        for n in 1..7 {
            for items in 0..40 {
                let live = ids(n);
                let q: Vec<usize> = live.iter().map(|me| quota(me, &live, items)).collect();
                assert_eq!(q.iter().sum::<usize>(), items);
                assert!(q.iter().max().unwrap() - q.iter().min().unwrap() <= 1, "{q:?}");
            }
        }
        // A replica that does not see itself yet still counts itself.
        assert_eq!(quota("b", &["a".into()], 4), 2);
    }

    #[test]
    fn a_replica_within_its_quota_keeps_what_it_holds() {
        let live = ids(2);
        let items: Vec<(String, Option<String>)> =
            (0..4).map(|i| (format!("t{i}"), Some(live[i % 2].clone()))).collect();
        assert_eq!(plan(&live[0], &live, &items), Moves::default());
    }

    /// The model: which replica holds each item's lock. A claim is `pg_try_advisory_lock`.
    struct Locks(BTreeMap<String, Option<String>>);

    impl Locks {
        fn view(&self) -> Vec<(String, Option<String>)> {
            self.0.iter().map(|(k, o)| (k.clone(), o.clone())).collect()
        }

        /// One replica's tick: plan on a fresh view, release, then claim.
        fn tick(&mut self, me: &str, live: &[String]) {
            let moves = plan(me, live, &self.view());
            for k in &moves.release {
                assert_eq!(self.0[k].as_deref(), Some(me), "released an item it did not hold");
                self.0.insert(k.clone(), None);
            }
            let mut got = 0;
            for k in &moves.candidates {
                if got == moves.want {
                    break;
                }
                if self.0[k].is_none() {
                    self.0.insert(k.clone(), Some(me.to_string()));
                    got += 1;
                }
            }
        }

        /// A replica's session ends: Postgres releases its locks.
        fn kill(&mut self, me: &str) {
            for owner in self.0.values_mut() {
                if owner.as_deref() == Some(me) {
                    *owner = None;
                }
            }
        }

        fn held_by(&self, me: &str) -> usize {
            self.0.values().filter(|o| o.as_deref() == Some(me)).count()
        }
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// Replica `i % live` ticks.
        Tick(usize),
        /// A new replica joins.
        Join,
        /// Replica `i % live` dies (if more than one is left).
        Kill(usize),
        /// An item is added to the registry.
        Add,
        /// Item `i % items` is removed from the registry (its holder releases it).
        Remove(usize),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => (0usize..16).prop_map(Event::Tick),
            1 => Just(Event::Join),
            1 => (0usize..16).prop_map(Event::Kill),
            1 => Just(Event::Add),
            1 => (0usize..64).prop_map(Event::Remove),
        ]
    }

    proptest! {
        #[test]
        fn replicas_converge_to_every_item_held_once_and_quotas_within_one(
            start_replicas in 1usize..5,
            start_items in 0usize..30,
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let mut next_id = start_replicas;
            let mut live = ids(start_replicas);
            let mut next_item = start_items;
            let mut locks = Locks((0..start_items).map(|i| (format!("table-{i:03}"), None)).collect());
            for e in events {
                match e {
                    Event::Tick(i) => {
                        let me = live[i % live.len()].clone();
                        locks.tick(&me, &live);
                    }
                    Event::Join => {
                        live.push(format!("replica-{next_id}"));
                        live.sort();
                        next_id += 1;
                    }
                    Event::Kill(i) if live.len() > 1 => {
                        let gone = live.remove(i % live.len());
                        locks.kill(&gone);
                    }
                    Event::Kill(_) => {}
                    Event::Add => {
                        locks.0.insert(format!("table-{next_item:03}"), None);
                        next_item += 1;
                    }
                    Event::Remove(i) if !locks.0.is_empty() => {
                        let k = locks.0.keys().nth(i % locks.0.len()).unwrap().clone();
                        locks.0.remove(&k);
                    }
                    Event::Remove(_) => {}
                }
            }
            // Membership is now stable: two rounds of ticks (in any order) settle everything.
            for _ in 0..2 {
                for me in live.clone() {
                    locks.tick(&me, &live);
                }
            }
            prop_assert!(locks.0.values().all(|o| o.as_ref().is_some_and(|o| live.contains(o))), "{:?}", locks.0);
            for me in &live {
                prop_assert_eq!(locks.held_by(me), quota(me, &live, locks.0.len()));
            }
            // Settled means settled: another round moves nothing.
            for me in &live {
                prop_assert_eq!(plan(me, &live, &locks.view()), Moves::default());
            }
        }
    }
}
