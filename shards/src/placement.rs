//! Where a conversation lives: conversation id → slot → node.
//!
//! This module owns the two pure functions of routing and nothing else — no IO, no clock, no
//! membership or ownership state (that lives in the cluster's `slot_owners` table):
//!
//! 1. **id → slot.** [`slot_of`] `= stable_hash(utf8(conversation_id)) % S`, where `S` is the slot
//!    count ([`DEFAULT_SLOT_COUNT`], fixed for the life of a cluster).
//! 2. **slot → node.** [`Placement`] is the *desired* placement: a consistent-hash ring
//!    (`hashring`) over the active nodes with [`DEFAULT_VNODES`] virtual nodes each. The rebalancer
//!    diffs two [`Placement::assignments`] with [`moves`] and moves slots toward the new one.
//!
//! # The hash, and its stability promise
//!
//! [`stable_hash`] is 64-bit FNV-1a over the bytes followed by MurmurHash3's `fmix64` finalizer.
//! FNV-1a alone is weak in its low bits (multiplication only carries upward, so the low `k` bits of
//! the result depend only on the low `k` bits of the state and input bytes), which is exactly what
//! `% 512` reads; `fmix64` is a bijection that spreads every bit over the whole word. It is
//! defined on bytes and on wrapping `u64` arithmetic only, so it is the same on every Rust version,
//! platform, word size and endianness, and it is simple to re-implement in a client (JS with
//! `BigInt`, Python with `& (2**64 - 1)`):
//!
//! ```text
//! h = 0xcbf29ce484222325                        // FNV-1a 64-bit offset basis
//! for each byte b:  h = (h XOR b) * 0x100000001b3   (mod 2^64)   // FNV 64-bit prime
//! h ^= h >> 33;  h *= 0xff51afd7ed558ccd  (mod 2^64)
//! h ^= h >> 33;  h *= 0xc4ceb9fe1a85ec53  (mod 2^64)
//! h ^= h >> 33
//! ```
//!
//! Check values: `stable_hash(b"") = 0xefd01f60ba992926`, `stable_hash(b"a") = 0x82a2a958a9bece5b`,
//! `stable_hash(b"conversation-1") = 0xc8153d9c8383273c` (slot 316 of 512).
//!
//! **Promise:** these values never change. Changing the hash, the byte encodings below or the slot
//! count of an existing cluster re-routes every conversation, i.e. it is a data migration, not a
//! refactor. The golden tests at the bottom of this file pin them.
//!
//! # The ring
//!
//! Every process must compute the same ring, so nothing on it goes through std's `Hash` encodings
//! or default hashers (std promises neither across versions or platforms):
//!
//! - virtual node `idx` (`0..V`) of node `id` sits at
//!   `stable_hash(utf8(id) ++ [0xff] ++ le_u32(idx))` (`0xff` never occurs in UTF-8, so the
//!   encoding is unambiguous);
//! - slot `s` is looked up at `stable_hash(b"slot:" ++ le_u32(s))`;
//! - the owner of a slot is the node of the first virtual node whose position is `>=` the slot's
//!   position, wrapping around to the lowest position;
//! - if two virtual nodes share a position (odds ≈ 2⁻⁶⁴ per pair), the one with the smaller
//!   `(id bytes, idx)` keeps it and the other is dropped.
//!
//! # Invariants
//!
//! - The placement is a pure function of the *set* of node ids and `V`: the order in which nodes
//!   were given or added, and the history of adds and removes, make no difference.
//! - [`Placement::owner`] is `None` only when there are no nodes.
//! - Minimal movement: adding a node moves slots only *to* that node (about `S/(N+1)` of them);
//!   removing a node moves only the slots it owned.
//! - Balance is statistical: a node's slot count has a relative standard deviation of about
//!   `sqrt(1/V + (N-1)/S)` (vnode arcs plus the sampling of `S` hashed slot positions). With
//!   `V = 128`, `S = 512` that is 0.08 at 2 nodes and 0.16 at 10, and the worst node in 100k random
//!   clusters owned 0.67–1.33× of `S/N` at 2 nodes, 0.48–1.57× at 5 and 0.33–1.84× at 10. More
//!   vnodes barely help (the slot sampling dominates); the rebalancer should not expect better.
//!
//! It must not allocate on the hot path ([`slot_of`] and [`Placement::owner`] do not), do IO, or
//! depend on process state (no random seeds, no std hashers).

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use hashring::HashRing;

/// Slots per cluster unless configured otherwise. Fixed for the life of a cluster: changing it
/// re-routes every conversation.
pub const DEFAULT_SLOT_COUNT: u32 = 512;

/// Virtual nodes per physical node on the placement ring. Beyond 128, more vnodes barely improve
/// balance at 512 slots (the sampling of slot positions dominates; see the module docs), while every
/// membership change rebuilds `N × V` entries.
pub const DEFAULT_VNODES: u32 = 128;

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV 64-bit prime (2⁴⁰ + 2⁸ + 0xb3).
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Separates the node id from the vnode index in a vnode's encoding; never a UTF-8 byte.
const VNODE_SEPARATOR: u8 = 0xff;
/// Prefix of a slot's encoding: domain-separates slot keys from vnode encodings.
const SLOT_KEY_PREFIX: &[u8] = b"slot:";

/// MurmurHash3's 64-bit finalizer: a bijection with full avalanche.
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash Ferry routes by: 64-bit FNV-1a over `bytes`, then MurmurHash3's `fmix64`.
///
/// ```text
/// h = 0xcbf29ce484222325
/// for each byte b:  h = (h XOR b) * 0x100000001b3       (wrapping, mod 2^64)
/// h ^= h >> 33;  h = h * 0xff51afd7ed558ccd             (wrapping)
/// h ^= h >> 33;  h = h * 0xc4ceb9fe1a85ec53             (wrapping)
/// h ^= h >> 33
/// ```
///
/// Stable across Rust versions, platforms and endianness; clients may compute it themselves (see
/// the module documentation for check values). Never change it: it decides where data lives.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hasher = StableHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

/// The slot of a conversation: `stable_hash(conversation_id.as_bytes()) % slot_count`.
///
/// `slot_count` is the cluster's fixed slot count `S` (config validation rejects 0).
///
/// # Panics
/// If `slot_count` is 0.
pub fn slot_of(conversation_id: &str, slot_count: u32) -> u32 {
    assert!(slot_count > 0, "slot_count must be at least 1");
    // The remainder is < slot_count, so it always fits back into a u32.
    (stable_hash(conversation_id.as_bytes()) % u64::from(slot_count)) as u32
}

/// Streaming [`stable_hash`] as a [`Hasher`], so `hashring` places keys with it.
///
/// FNV-1a consumes one byte at a time, so the result depends only on the concatenation of the
/// bytes written, never on how they were split into `write` calls. Integers are written
/// little-endian (and `usize`/`isize` as 64-bit) instead of std's native-endian defaults.
#[derive(Clone, Copy, Debug)]
struct StableHasher {
    /// FNV-1a state before the finalizer.
    state: u64,
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher {
            state: FNV_OFFSET_BASIS,
        }
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.state = (self.state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
    }

    fn finish(&self) -> u64 {
        fmix64(self.state)
    }

    fn write_u8(&mut self, n: u8) {
        self.write(&[n]);
    }
    fn write_u16(&mut self, n: u16) {
        self.write(&n.to_le_bytes());
    }
    fn write_u32(&mut self, n: u32) {
        self.write(&n.to_le_bytes());
    }
    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_le_bytes());
    }
    fn write_u128(&mut self, n: u128) {
        self.write(&n.to_le_bytes());
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_i8(&mut self, n: i8) {
        self.write(&n.to_le_bytes());
    }
    fn write_i16(&mut self, n: i16) {
        self.write(&n.to_le_bytes());
    }
    fn write_i32(&mut self, n: i32) {
        self.write(&n.to_le_bytes());
    }
    fn write_i64(&mut self, n: i64) {
        self.write(&n.to_le_bytes());
    }
    fn write_i128(&mut self, n: i128) {
        self.write(&n.to_le_bytes());
    }
    fn write_isize(&mut self, n: isize) {
        self.write_i64(n as i64);
    }
}

/// Builds [`StableHasher`]s for the ring (`hashring` defaults to SipHash keyed by std's `Hash`).
#[derive(Clone, Copy, Debug, Default)]
struct StableBuildHasher;

impl BuildHasher for StableBuildHasher {
    type Hasher = StableHasher;

    fn build_hasher(&self) -> StableHasher {
        StableHasher::default()
    }
}

/// One of a node's virtual nodes on the ring. `Ord` is `(node, idx)`, the collision tie-break.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct VNode {
    /// The physical node; shared by all its vnodes.
    node: Arc<str>,
    /// Which of the node's `V` vnodes this is.
    idx: u32,
}

impl VNode {
    /// The vnode's ring position: `stable_hash(id ++ [0xff] ++ le_u32(idx))`.
    fn position(&self) -> u64 {
        StableBuildHasher.hash_one(self)
    }
}

impl Hash for VNode {
    /// Fixed byte encoding (see the module docs); never std's `str`/`u32` encodings.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.node.as_bytes());
        state.write(&[VNODE_SEPARATOR]);
        state.write(&self.idx.to_le_bytes());
    }
}

/// A slot as a ring lookup key: hashed as `b"slot:" ++ le_u32(slot)`.
struct SlotKey(u32);

impl Hash for SlotKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(SLOT_KEY_PREFIX);
        state.write(&self.0.to_le_bytes());
    }
}

/// Desired slot → node placement: a consistent-hash ring with virtual nodes over a set of node ids.
///
/// A pure function of the node set and the vnode count (see the module docs for the exact rule);
/// two processes with the same inputs compute the same owners. Node ids are non-empty: an empty id
/// is ignored, because `""` stands for "no owner" in [`moves`].
#[derive(Clone)]
pub struct Placement {
    /// Physical node ids, sorted and deduplicated; the ring is rebuilt from this set alone, which is
    /// what makes placement independent of insertion order and history.
    nodes: BTreeSet<Arc<str>>,
    /// Virtual nodes per physical node (at least 1, so a non-empty set always owns every slot).
    vnodes_per_node: u32,
    /// `nodes.len() × vnodes_per_node` vnodes (fewer after a position collision), sorted by position.
    ring: HashRing<VNode, StableBuildHasher>,
}

impl Placement {
    /// Places slots on `nodes` with `vnodes_per_node` virtual nodes each ([`DEFAULT_VNODES`] is
    /// the cluster default; 0 is treated as 1). Duplicate and empty ids are ignored; order does
    /// not matter.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(
        nodes: I,
        vnodes_per_node: u32,
    ) -> Placement {
        let nodes = nodes
            .into_iter()
            .filter(|node| !node.as_ref().is_empty())
            .map(|node| Arc::from(node.as_ref()))
            .collect();
        let vnodes_per_node = vnodes_per_node.max(1);
        Placement {
            ring: build_ring(&nodes, vnodes_per_node),
            nodes,
            vnodes_per_node,
        }
    }

    /// The node ids, sorted and deduplicated.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.to_string()).collect()
    }

    /// Virtual nodes per physical node.
    pub fn vnodes_per_node(&self) -> u32 {
        self.vnodes_per_node
    }

    /// The node `slot` is placed on; `None` only when there are no nodes. Allocation-free.
    pub fn owner(&self, slot: u32) -> Option<&str> {
        self.ring.get(&SlotKey(slot)).map(|vnode| &*vnode.node)
    }

    /// The owner of every slot in `0..slot_count` (index = slot), or an empty `Vec` when there
    /// are no nodes and so no slot has an owner.
    pub fn assignments(&self, slot_count: u32) -> Vec<String> {
        if self.nodes.is_empty() {
            return Vec::new();
        }
        (0..slot_count)
            .filter_map(|slot| self.owner(slot).map(str::to_owned))
            .collect()
    }

    /// Adds `node` (no-op if it is empty or already present). Slots move only to `node`.
    pub fn add_node(&mut self, node: &str) {
        if node.is_empty() || self.nodes.contains(node) {
            return;
        }
        self.nodes.insert(Arc::from(node));
        self.ring = build_ring(&self.nodes, self.vnodes_per_node);
    }

    /// Removes `node` (no-op if absent). Only the slots it owned move.
    pub fn remove_node(&mut self, node: &str) {
        if self.nodes.remove(node) {
            self.ring = build_ring(&self.nodes, self.vnodes_per_node);
        }
    }
}

impl PartialEq for Placement {
    /// Same node set and vnode count, hence the same ring.
    fn eq(&self, other: &Placement) -> bool {
        self.nodes == other.nodes && self.vnodes_per_node == other.vnodes_per_node
    }
}

impl Eq for Placement {}

impl fmt::Debug for Placement {
    // The ring itself (N × V entries) is derived from these two fields and too long to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Placement")
            .field("nodes", &self.nodes)
            .field("vnodes_per_node", &self.vnodes_per_node)
            .finish_non_exhaustive()
    }
}

/// Builds the ring from scratch. Membership changes are rare and the ring is small (`N × V`
/// entries), and rebuilding keeps the result a function of the node set alone: incremental
/// `hashring` adds would break position ties by insertion order, and `hashring::remove` finds by
/// position, so it could remove the wrong vnode of a collision.
fn build_ring(
    nodes: &BTreeSet<Arc<str>>,
    vnodes_per_node: u32,
) -> HashRing<VNode, StableBuildHasher> {
    let mut vnodes: Vec<(u64, VNode)> = nodes
        .iter()
        .flat_map(|node| {
            (0..vnodes_per_node).map(move |idx| VNode {
                node: Arc::clone(node),
                idx,
            })
        })
        .map(|vnode| (vnode.position(), vnode))
        .collect();
    // Sort by (position, node, idx) and keep the first vnode of each position: the documented
    // tie-break, and no two ring entries share a position, so lookups are unambiguous.
    vnodes.sort_unstable();
    vnodes.dedup_by_key(|(position, _)| *position);
    let mut ring = HashRing::with_hasher(StableBuildHasher);
    ring.batch_add(vnodes.into_iter().map(|(_, vnode)| vnode).collect());
    ring
}

/// The slots whose owner differs between two [`Placement::assignments`], as
/// `(slot, from, to)` in slot order.
///
/// Both normally cover the same slot count (it is fixed for a cluster). A slot present on one side
/// only — an empty assignment means there were no nodes — is reported with `""` on the other side,
/// so the first node of a cluster receives every slot from `""` and the last one hands them to `""`.
pub fn moves(before: &[String], after: &[String]) -> Vec<(u32, String, String)> {
    let slots = before.len().max(after.len());
    (0u32..)
        .zip(0..slots)
        .filter_map(|(slot, i)| {
            let from = before.get(i).map_or("", String::as_str);
            let to = after.get(i).map_or("", String::as_str);
            (from != to).then(|| (slot, from.to_owned(), to.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    // ---- an independent reference of the documented algorithm -------------------------------

    const MASK_64: u128 = (1 << 64) - 1;

    /// FNV-1a in u128 arithmetic masked to 64 bits: shares no code with [`StableHasher`].
    fn reference_fnv1a(bytes: &[u8]) -> u64 {
        let mut h: u128 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h ^= u128::from(b);
            h = (h * 0x100_0000_01b3) & MASK_64;
        }
        h as u64
    }

    fn reference_fmix64(k: u64) -> u64 {
        let mut k = u128::from(k);
        k ^= k >> 33;
        k = (k * 0xff51_afd7_ed55_8ccd) & MASK_64;
        k ^= k >> 33;
        k = (k * 0xc4ce_b9fe_1a85_ec53) & MASK_64;
        k ^= k >> 33;
        k as u64
    }

    fn reference_hash(bytes: &[u8]) -> u64 {
        reference_fmix64(reference_fnv1a(bytes))
    }

    /// The ring rule of the module docs, by brute force over explicit byte strings (no `Hash`
    /// impls, no `hashring`): what a client in another language would write.
    fn reference_assignments(nodes: &[String], vnodes: u32, slot_count: u32) -> Vec<String> {
        let mut ring: Vec<(u64, &str, u32)> = Vec::new();
        for node in nodes.iter().filter(|n| !n.is_empty()) {
            for idx in 0..vnodes.max(1) {
                let mut bytes = node.as_bytes().to_vec();
                bytes.push(0xff);
                bytes.extend_from_slice(&idx.to_le_bytes());
                ring.push((reference_hash(&bytes), node, idx));
            }
        }
        ring.sort();
        ring.dedup_by_key(|entry| entry.0);
        if ring.is_empty() {
            return Vec::new();
        }
        (0..slot_count)
            .map(|slot| {
                let mut bytes = b"slot:".to_vec();
                bytes.extend_from_slice(&slot.to_le_bytes());
                let position = reference_hash(&bytes);
                let i = ring.partition_point(|entry| entry.0 < position) % ring.len();
                ring[i].1.to_owned()
            })
            .collect()
    }

    fn long_id() -> String {
        "0123456789abcdef".repeat(8)
    }

    // ---- golden values: these pin the routing of every existing conversation ----------------

    #[test]
    fn reference_fnv1a_matches_published_test_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv, `test_fnv.c`).
        assert_eq!(reference_fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(reference_fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(reference_fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(reference_fmix64(0), 0);
    }

    #[test]
    fn stable_hash_golden_values() {
        let long = long_id();
        let golden: [(&[u8], u64); 7] = [
            (b"", 0xefd0_1f60_ba99_2926),
            (b"a", 0x82a2_a958_a9be_ce5b),
            (b"conversation-1", 0xc815_3d9c_8383_273c),
            (long.as_bytes(), 0x6bb3_e816_dc50_e8be),
            (b"conversation-2", 0xc86c_e066_9598_f23b),
            (b"support:ticket-8812", 0xc674_2b93_4531_9925),
            (b"dm:alice@example.com:bob", 0xa572_b3e9_b7a3_af12),
        ];
        for (bytes, expected) in golden {
            assert_eq!(stable_hash(bytes), expected, "stable_hash({bytes:?})");
            assert_eq!(reference_hash(bytes), expected, "reference({bytes:?})");
        }
    }

    #[test]
    fn slot_of_golden_values_for_512_slots() {
        let long = long_id();
        let golden = [
            ("", 294),
            ("a", 91),
            ("conversation-1", 316),
            (long.as_str(), 190),
            ("conversation-2", 59),
            ("support:ticket-8812", 293),
            ("dm:alice@example.com:bob", 274),
        ];
        for (id, slot) in golden {
            assert_eq!(slot_of(id, DEFAULT_SLOT_COUNT), slot, "slot_of({id:?})");
        }
        assert_eq!(slot_of("conversation-1", 1), 0);
    }

    #[test]
    #[should_panic(expected = "slot_count must be at least 1")]
    fn slot_of_rejects_zero_slots() {
        slot_of("conversation-1", 0);
    }

    #[test]
    fn ring_positions_golden_values() {
        let vnode = VNode {
            node: Arc::from("node-a"),
            idx: 0,
        };
        assert_eq!(vnode.position(), 0x1c4d_d524_07e9_984c);
        assert_eq!(vnode.position(), stable_hash(b"node-a\xff\x00\x00\x00\x00"));
        assert_eq!(
            StableBuildHasher.hash_one(SlotKey(0)),
            0xa2bf_5210_9f22_d8f8
        );
        assert_eq!(
            StableBuildHasher.hash_one(SlotKey(0x0102_0304)),
            stable_hash(b"slot:\x04\x03\x02\x01")
        );
    }

    #[test]
    fn placement_golden_values() {
        let placement = Placement::new(["node-c", "node-a", "node-b"], DEFAULT_VNODES);
        let assignments = placement.assignments(DEFAULT_SLOT_COUNT);
        let first: Vec<&str> = assignments[..8].iter().map(String::as_str).collect();
        assert_eq!(
            first,
            ["node-b", "node-a", "node-c", "node-a", "node-a", "node-a", "node-a", "node-c"]
        );
        let counts = owned_counts(&assignments);
        assert_eq!(counts["node-a"], 198);
        assert_eq!(counts["node-b"], 149);
        assert_eq!(counts["node-c"], 165);
    }

    #[test]
    fn hasher_ignores_chunking_and_writes_integers_little_endian() {
        let bytes = long_id().into_bytes();
        for split in [0, 1, 7, 64, 127, 128] {
            let mut hasher = StableHasher::default();
            hasher.write(&bytes[..split]);
            hasher.write(&bytes[split..]);
            assert_eq!(hasher.finish(), stable_hash(&bytes), "split at {split}");
        }
        let mut bytewise = StableHasher::default();
        bytes.iter().for_each(|&b| bytewise.write_u8(b));
        assert_eq!(bytewise.finish(), stable_hash(&bytes));

        let mut ints = StableHasher::default();
        ints.write_u32(0x0102_0304);
        ints.write_u64(0x0506_0708_090a_0b0c);
        ints.write_usize(1);
        assert_eq!(
            ints.finish(),
            stable_hash(&[4, 3, 2, 1, 0x0c, 0x0b, 0x0a, 9, 8, 7, 6, 5, 1, 0, 0, 0, 0, 0, 0, 0])
        );
    }

    // ---- slot distribution ------------------------------------------------------------------

    /// splitmix64: a fixed, dependency-free generator so the corpus (and the test) is deterministic.
    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chi_square(counts: &[u32], total: u32) -> f64 {
        let expected = f64::from(total) / counts.len() as f64;
        counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum()
    }

    /// 200k ids — 100k random UUID-shaped ones and 100k sequential `conversation-N` (structured
    /// input is the hard case for FNV) — over 512 slots. With 200k ids the mean is 390.6 and a
    /// binomial σ is 19.7, so ±25% is a 5σ bound an ideal hash passes; with 100k it would be 3.5σ,
    /// which a perfect hash fails for about one corpus in five. Each corpus must also pass a
    /// χ² test (511 degrees of freedom: mean 511, σ ≈ 32; bound = mean + 6σ). Measured: χ² 509.8
    /// (random) and 509.4 (sequential); combined counts 338..=444, i.e. 0.87–1.14× the mean.
    #[test]
    fn slot_of_spreads_ids_evenly_over_512_slots() {
        const IDS: u32 = 100_000;
        let mut rng = 0x5eed_u64;
        let random: Vec<String> = (0..IDS)
            .map(|_| {
                let (a, b) = (splitmix64(&mut rng), splitmix64(&mut rng));
                format!(
                    "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xffff,
                    b >> 48,
                    b & 0xffff_ffff_ffff
                )
            })
            .collect();
        let sequential: Vec<String> = (0..IDS).map(|i| format!("conversation-{i}")).collect();

        let mut total = vec![0u32; DEFAULT_SLOT_COUNT as usize];
        for corpus in [&random, &sequential] {
            let mut counts = vec![0u32; DEFAULT_SLOT_COUNT as usize];
            for id in corpus {
                counts[slot_of(id, DEFAULT_SLOT_COUNT) as usize] += 1;
            }
            let chi2 = chi_square(&counts, IDS);
            assert!(chi2 < 511.0 + 6.0 * 32.0, "χ² = {chi2:.1}");
            total.iter_mut().zip(&counts).for_each(|(t, c)| *t += c);
        }
        let mean = f64::from(2 * IDS) / f64::from(DEFAULT_SLOT_COUNT);
        let (min, max) = (total.iter().min().unwrap(), total.iter().max().unwrap());
        assert!(
            f64::from(*min) >= 0.75 * mean && f64::from(*max) <= 1.25 * mean,
            "slot counts {min}..={max}, mean {mean:.1}"
        );
    }

    // ---- placement: unit behaviour ----------------------------------------------------------

    fn owned_counts(assignments: &[String]) -> BTreeMap<&str, u32> {
        let mut counts = BTreeMap::new();
        for owner in assignments {
            *counts.entry(owner.as_str()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn empty_placement_owns_nothing() {
        let mut placement = Placement::new(Vec::<String>::new(), DEFAULT_VNODES);
        assert_eq!(placement.owner(0), None);
        assert!(placement.assignments(DEFAULT_SLOT_COUNT).is_empty());
        placement.add_node("node-a");
        assert_eq!(placement.owner(0), Some("node-a"));
        placement.remove_node("node-a");
        assert_eq!(placement.owner(0), None);
    }

    #[test]
    fn nodes_are_sorted_deduplicated_and_never_empty() {
        let mut placement = Placement::new(["b", "a", "", "b"], 0);
        assert_eq!(placement.nodes(), ["a", "b"]);
        assert_eq!(placement.vnodes_per_node(), 1);
        placement.add_node("");
        placement.add_node("a");
        placement.remove_node("zzz");
        assert_eq!(placement.nodes(), ["a", "b"]);
        let assignments = placement.assignments(64);
        assert_eq!(assignments.len(), 64);
        assert!(assignments.iter().all(|owner| owner == "a" || owner == "b"));
    }

    #[test]
    fn moves_diffs_assignments_slot_by_slot() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let before = s(&["a", "a", "b", "c"]);
        let after = s(&["a", "d", "b", "d"]);
        assert_eq!(
            moves(&before, &after),
            [
                (1, "a".to_string(), "d".to_string()),
                (3, "c".to_string(), "d".to_string())
            ]
        );
        assert!(moves(&before, &before).is_empty());
        // The first node of a cluster takes every slot from "", the last one hands them back.
        let bootstrap = moves(&[], &s(&["a", "a"]));
        assert_eq!(
            bootstrap,
            [
                (0, String::new(), "a".into()),
                (1, String::new(), "a".into())
            ]
        );
        assert_eq!(
            moves(&s(&["a"]), &[]),
            [(0, "a".to_string(), String::new())]
        );
    }

    // ---- placement: properties --------------------------------------------------------------

    /// Relative standard deviation of one node's slot count, `sqrt(1/V + (N-1)/S)`: the share of
    /// the ring held by V random vnodes varies by ≈ 1/√V, and S hashed slot positions sample that
    /// share binomially (relative variance (1-p)/(S·p) with p = 1/N). Measured over 100k random
    /// clusters per N (V = 128, S = 512) the real spread is 0.077 (N = 2) to 0.156 (N = 10),
    /// i.e. at or just under this formula's 0.099 to 0.159.
    fn load_sigma(nodes: usize) -> f64 {
        (1.0 / f64::from(DEFAULT_VNODES) + (nodes as f64 - 1.0) / f64::from(DEFAULT_SLOT_COUNT))
            .sqrt()
    }

    /// Tolerated load of one node, as a multiple of S/N: `[1 - 5σ, 1 + 6σ]`, wider above because
    /// the load is skewed right. That is [0.51, 1.59] at N = 2 and [0.20, 1.96] at N = 10. The
    /// worst nodes in 100k random clusters per N (10⁶ nodes at N = 10) were 0.67–1.33× (N = 2),
    /// 0.48–1.57× (N = 5) and 0.33–1.84× (N = 10). A run of the balance and add properties draws
    /// about 1 500 nodes with a random seed, so the band sits beyond anything 10⁶ draws reached and
    /// the test does not flake. A tighter per-node band cannot hold at N = 10 with V = 128 and
    /// S = 512: the noise of sampling 51 slots dominates. `balance_spread_matches_theory` checks
    /// the spread itself, tightly and deterministically.
    fn balance_band(nodes: usize) -> (f64, f64) {
        let sigma = load_sigma(nodes);
        (1.0 - 5.0 * sigma, 1.0 + 6.0 * sigma)
    }

    fn assert_balanced(assignments: &[String], nodes: &[String]) -> Result<(), TestCaseError> {
        let fair = f64::from(DEFAULT_SLOT_COUNT) / nodes.len() as f64;
        let (low, high) = balance_band(nodes.len());
        let counts = owned_counts(assignments);
        for node in nodes {
            let load = f64::from(counts.get(node.as_str()).copied().unwrap_or(0)) / fair;
            prop_assert!(
                (low..=high).contains(&load),
                "{node:?} owns {load:.2}× its fair share (band {low:.2}..={high:.2}): {counts:?}"
            );
        }
        Ok(())
    }

    /// Node ids as operators write them: host names, `host:port`, generated names, any Unicode.
    fn node_id() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z][a-z0-9-]{0,15}",
            "ferry-[0-9]{1,3}",
            "10\\.0\\.[0-9]{1,3}\\.[0-9]{1,3}:[0-9]{4}",
            "\\PC{1,12}",
        ]
    }

    fn node_set(sizes: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<String>> {
        prop::collection::btree_set(node_id(), sizes).prop_map(|set| set.into_iter().collect())
    }

    /// Deterministic: 60 clusters for each N in 2..=10 with generated names; every node's load is
    /// turned into a z-score with [`load_sigma`] and the pooled standard deviation of those z-scores
    /// must stay under 1.06. Measured 0.956 for this corpus (0.935–0.983 over ten other seeds, so
    /// the bound is ≈ 7 of the estimate's σ ≈ 0.014 away); a ring with half the distinct vnodes
    /// lands at ≈ 1.12 and fails.
    #[test]
    fn balance_spread_matches_theory() {
        let mut rng = 0x00ba_1ace_u64;
        let mut z_squares = Vec::new();
        for n in 2..=10 {
            for _ in 0..60 {
                let nodes: Vec<String> = (0..n)
                    .map(|i| format!("node-{i}-{:x}", splitmix64(&mut rng) >> 40))
                    .collect();
                let placement = Placement::new(&nodes, DEFAULT_VNODES);
                let assignments = placement.assignments(DEFAULT_SLOT_COUNT);
                let counts = owned_counts(&assignments);
                let fair = f64::from(DEFAULT_SLOT_COUNT) / n as f64;
                for node in &nodes {
                    let load = f64::from(counts.get(node.as_str()).copied().unwrap_or(0)) / fair;
                    z_squares.push(((load - 1.0) / load_sigma(n)).powi(2));
                }
            }
        }
        let pooled = (z_squares.iter().sum::<f64>() / z_squares.len() as f64).sqrt();
        assert!(pooled < 1.06, "pooled z-score spread {pooled:.3}");
    }

    proptest! {
        // Each case builds up to a dozen rings; 128 cases keep the module's tests under a few
        // seconds in a debug build.
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn placement_matches_the_documented_ring_rule(nodes in node_set(0..=6), vnodes in 1u32..=64) {
            let placement = Placement::new(&nodes, vnodes);
            prop_assert_eq!(
                placement.assignments(DEFAULT_SLOT_COUNT),
                reference_assignments(&nodes, vnodes, DEFAULT_SLOT_COUNT)
            );
        }

        #[test]
        fn placement_is_balanced(nodes in node_set(2..=10)) {
            let placement = Placement::new(&nodes, DEFAULT_VNODES);
            let assignments = placement.assignments(DEFAULT_SLOT_COUNT);
            prop_assert_eq!(assignments.len(), DEFAULT_SLOT_COUNT as usize);
            assert_balanced(&assignments, &nodes)?;
        }

        /// Every changed slot goes to the added node, and what it receives is exactly what it owns
        /// afterwards: a fair share, S/(N+1) within the balance band.
        #[test]
        fn adding_a_node_moves_slots_only_to_it(
            mut nodes in node_set(2..=10),
            added_at in any::<prop::sample::Index>(),
        ) {
            let added = nodes.remove(added_at.index(nodes.len()));
            let mut placement = Placement::new(&nodes, DEFAULT_VNODES);
            let before = placement.assignments(DEFAULT_SLOT_COUNT);
            placement.add_node(&added);
            let after = placement.assignments(DEFAULT_SLOT_COUNT);

            let moved = moves(&before, &after);
            for (slot, from, to) in &moved {
                prop_assert_eq!(to, &added, "slot {} moved {} -> {}", slot, from, to);
            }
            let now_owned = after.iter().filter(|owner| **owner == added).count();
            prop_assert_eq!(moved.len(), now_owned);
            nodes.push(added);
            assert_balanced(&after, &nodes)?;
        }

        /// Only the removed node's slots change owner, and all of them do.
        #[test]
        fn removing_a_node_moves_only_its_slots(
            nodes in node_set(2..=10),
            removed_at in any::<prop::sample::Index>(),
        ) {
            let removed = nodes[removed_at.index(nodes.len())].clone();
            let mut placement = Placement::new(&nodes, DEFAULT_VNODES);
            let before = placement.assignments(DEFAULT_SLOT_COUNT);
            placement.remove_node(&removed);
            let after = placement.assignments(DEFAULT_SLOT_COUNT);

            let moved = moves(&before, &after);
            for (slot, from, to) in &moved {
                prop_assert_eq!(from, &removed, "slot {} moved {} -> {}", slot, from, to);
            }
            let owned_before = before.iter().filter(|owner| **owner == removed).count();
            prop_assert_eq!(moved.len(), owned_before);
        }

        /// Neither the order nodes are given or added in nor the history of adds and removes
        /// changes the placement.
        #[test]
        fn placement_ignores_order_and_history(
            (nodes, shuffled) in node_set(1..=10)
                .prop_flat_map(|nodes| (Just(nodes.clone()), Just(nodes).prop_shuffle())),
            transient in node_id(),
        ) {
            let expected = Placement::new(&nodes, DEFAULT_VNODES).assignments(DEFAULT_SLOT_COUNT);

            prop_assert_eq!(
                Placement::new(&shuffled, DEFAULT_VNODES).assignments(DEFAULT_SLOT_COUNT),
                expected.clone()
            );

            let mut incremental = Placement::new(Vec::<String>::new(), DEFAULT_VNODES);
            for node in shuffled.iter().rev() {
                incremental.add_node(node);
            }
            prop_assert_eq!(incremental.assignments(DEFAULT_SLOT_COUNT), expected.clone());

            if !nodes.contains(&transient) {
                incremental.add_node(&transient);
                incremental.remove_node(&transient);
                prop_assert_eq!(incremental.assignments(DEFAULT_SLOT_COUNT), expected);
            }
        }

        /// Two placements built independently (as two processes would) agree on every slot.
        #[test]
        fn placement_is_deterministic(nodes in node_set(1..=10)) {
            let first = Placement::new(&nodes, DEFAULT_VNODES);
            let second = Placement::new(nodes.iter().map(String::as_str), DEFAULT_VNODES);
            prop_assert_eq!(&first, &second);
            for slot in 0..DEFAULT_SLOT_COUNT {
                prop_assert_eq!(first.owner(slot), second.owner(slot));
                prop_assert!(first.owner(slot).is_some());
            }
        }
    }
}
