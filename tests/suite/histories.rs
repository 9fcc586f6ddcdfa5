//! Random lease histories checked step by step against an exact model of the buckets.
//!
//! A history mixes what users do: acquires on a plain entity, on children cascading to a
//! parent and on the parent itself; adjustments up (into debt) and down (refunds) through
//! the lease or a handle; commits, rollbacks, leases dropped open, acquire futures dropped
//! after one poll; short and long waits. After every step each bucket the history touches
//! is read back and compared, to the millitoken and the refill carry, with a model written
//! here from the documented rules (lazy refill with carry, all-or-nothing takes, forced
//! adjustments capped at capacity). Every acquire's verdict, its violations and its
//! `retry_after` are compared too, so an over-admission or a lost give-back shows at the
//! step that caused it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;

use proptest::prelude::*;
use zae_limiter::bucket::BucketState;
use zae_limiter::clock::{Clock, ManualClock};
use zae_limiter::{Error, Lease, Limit, RateLimiter};

/// The resource every history uses.
const RESOURCE: &str = "api";

/// The limits every acquire names: a slow limit whose refill leaves a carry (3 per 10 s,
/// 7 at most) and one whose burst is above its rate (50 per minute, 80 at most).
pub fn limits() -> [Limit; 2] {
    reconfigured(false)
}

/// [`limits`], or (`changed`) with `rpm` changed to 5 at most, 2 per 4 s: what a
/// [`Step::Reconfigure`] switches between.
fn reconfigured(changed: bool) -> [Limit; 2] {
    let rpm = if changed {
        Limit::custom("rpm", 5, 2, 4)
    } else {
        Limit::custom("rpm", 7, 3, 10)
    };
    [rpm, Limit::per_minute("tpm", 50).with_burst(80)]
}

/// A parent's own limit in [`LimitsFrom::Stored`] histories: `tpm` again, with other
/// parameters (120 at most, 70 per minute), so a cascade charges each side by its own.
pub fn parent_limits() -> [Limit; 1] {
    [Limit::custom("tpm", 120, 70, 60)]
}

/// Where a history's limits come from.
#[derive(Clone, Copy, Debug)]
pub enum LimitsFrom {
    /// Every acquire names [`limits`]; a cascade charges the parent by them too.
    Explicit,
    /// Stored: [`limits`] as the resource's default, [`parent_limits`] as the parent's own.
    /// A cascade charges each side its own limits, and adjustments move only the limits
    /// they name on each side.
    Stored,
    /// As [`Self::Stored`], the parent's limit soft: it never refuses, its bucket goes
    /// into debt instead.
    StoredSoftParent,
    /// As [`Self::Stored`], with `kid-b` bypassed: admitted and counted, nothing taken
    /// from it (its parent is still charged), its adjustments and refunds count only.
    StoredKidBypassed,
}

impl LimitsFrom {
    /// The limits each of the four entities is charged by.
    fn per_entity(self) -> [Vec<Limit>; 4] {
        let own = limits().to_vec();
        match self {
            LimitsFrom::Explicit => [own.clone(), own.clone(), own.clone(), own],
            LimitsFrom::Stored | LimitsFrom::StoredSoftParent | LimitsFrom::StoredKidBypassed => {
                [own.clone(), own.clone(), own, self.parent_limits().to_vec()]
            }
        }
    }

    /// The parent's own limits, when stored.
    fn parent_limits(self) -> [Limit; 1] {
        match self {
            LimitsFrom::StoredSoftParent => parent_limits().map(Limit::soft),
            _ => parent_limits(),
        }
    }
}

/// One step of a history. Lease indexes pick among the leases the history holds (modulo
/// their count), closed ones included, so closed leases are committed and adjusted too.
#[derive(Clone, Debug)]
pub enum Step {
    /// Moves the clock forward.
    Wait { ms: u32 },
    /// Acquires on entity `who` (0 plain, 1 and 2 children cascading to 3, 3 the parent)
    /// through limiter `by` (modulo the limiters: processes sharing one table).
    Acquire { by: u8, who: u8, rpm: u8, tpm: u8 },
    /// Adjusts a lease by these deltas (through a handle when `handle`).
    Adjust {
        lease: u8,
        rpm: i8,
        tpm: i16,
        handle: bool,
    },
    /// Commits a lease.
    Commit { lease: u8 },
    /// Rolls a lease back.
    Rollback { lease: u8 },
    /// Drops a lease (rolled back in the background if open).
    Drop { lease: u8 },
    /// Polls an acquire once and drops it, whatever it had done.
    Abandon { by: u8, who: u8, rpm: u8, tpm: u8 },
    /// Switches the limits acquires name between two sets whose `rpm` differs (limits
    /// named by every acquire only): an acquire adopts the new parameters (refilled at
    /// the old ones up to then), a rejection too, and a lease settles at its own.
    Reconfigure,
}

/// Histories of up to `len` steps, their waits either 0 or at least `min_wait_ms`.
///
/// DynamoDB takes tokens without moving `rf` while `rf` is within the fresh window `W` of
/// now (DESIGN section 9), crediting up to the refill over `W` that an exact bucket
/// would have discarded while full: within the documented bound, but not exact. Waits of
/// 0 or above `W` (3.4 s for [`limits`]) keep every write exact there.
pub fn history(len: usize, min_wait_ms: u32) -> impl Strategy<Value = Vec<Step>> {
    let wait = prop_oneof![
        Just(0u32),
        1u32..40,
        100u32..4_000,
        5_000u32..30_000,
        60_000u32..200_000,
    ]
    .prop_map(move |ms| if ms == 0 { 0 } else { ms.max(min_wait_ms) });
    let step = prop_oneof![
        3 => wait.prop_map(|ms| Step::Wait { ms }),
        5 => (0u8..2, 0u8..4, 0u8..4, 0u8..40)
            .prop_map(|(by, who, rpm, tpm)| Step::Acquire { by, who, rpm, tpm }),
        3 => (any::<u8>(), -2i8..3, -40i16..60, any::<bool>())
            .prop_map(|(lease, rpm, tpm, handle)| Step::Adjust { lease, rpm, tpm, handle }),
        3 => any::<u8>().prop_map(|lease| Step::Commit { lease }),
        2 => any::<u8>().prop_map(|lease| Step::Rollback { lease }),
        1 => any::<u8>().prop_map(|lease| Step::Drop { lease }),
        1 => (0u8..2, 0u8..4, 0u8..4, 0u8..40)
            .prop_map(|(by, who, rpm, tpm)| Step::Abandon { by, who, rpm, tpm }),
        1 => Just(Step::Reconfigure),
    ];
    proptest::collection::vec(step, 1..=len)
}

/// The fresh window `W` of [`limits`] on DynamoDB, rounded up: waits above it keep a
/// DynamoDB history exact.
pub const ABOVE_FRESH_WINDOW_MS: u32 = 3_400;

/// How long a history waits between steps, and so how exact a backend is over it.
#[derive(Clone, Copy, Debug)]
pub enum Waits {
    /// 0 or above DynamoDB's fresh window (see [`ABOVE_FRESH_WINDOW_MS`]): every backend
    /// is exact to the millitoken and the carry.
    OutsideFreshWindow,
    /// Any: DynamoDB may take without refilling while `rf` is fresh, so after a step a
    /// bucket may hold up to the refill over the window more than exact (never less).
    Any,
}

impl Waits {
    fn min_wait_ms(self) -> u32 {
        match self {
            Waits::OutsideFreshWindow => ABOVE_FRESH_WINDOW_MS,
            Waits::Any => 0,
        }
    }

    fn slack_ms(self) -> u32 {
        match self {
            Waits::OutsideFreshWindow => 0,
            Waits::Any => ABOVE_FRESH_WINDOW_MS,
        }
    }
}

/// The fixed histories of `tag` (see [`runner`]) on `limiters` (all on `clock`), each under
/// `{tag}{n}-` and with the next way of getting its limits: panics at the first difference
/// from the model, with the history.
pub async fn run_fixed(limiters: &[RateLimiter], clock: &ManualClock, tag: &str, waits: Waits) {
    use proptest::strategy::{Strategy, ValueTree};
    let ways = [
        LimitsFrom::Explicit,
        LimitsFrom::Stored,
        LimitsFrom::StoredSoftParent,
        LimitsFrom::StoredKidBypassed,
    ];
    let mut runner = runner(tag);
    for n in 0..12 {
        let history = history(40, waits.min_wait_ms())
            .new_tree(&mut runner)
            .expect("a history")
            .current();
        let prefix = format!("{tag}{n}-");
        let from = ways[n % ways.len()];
        setup(&limiters[0], &prefix, from).await;
        let slack_ms = waits.slack_ms();
        if let Err(mismatch) = run(limiters, clock, &prefix, from, slack_ms, &history).await {
            panic!("history {n} ({from:?}) differs from the model {mismatch:?}");
        }
    }
}

/// The generator of the fixed histories of `tag`: the same ones every run, or others
/// under `ZAE_HISTORY_SEED` (a byte), to explore or to reproduce.
pub fn runner(tag: &str) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let seed = std::env::var("ZAE_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2u8);
    let mut bytes = [seed; 32];
    for (at, b) in tag.bytes().enumerate().take(31) {
        bytes[at + 1] = b;
    }
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// A limit's parameters in millitokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Params {
    capacity: i64,
    amount: i64,
    period_ms: i64,
}

impl Params {
    fn of(limit: &Limit) -> Self {
        Params {
            capacity: limit.capacity as i64 * 1_000,
            amount: limit.refill_amount as i64 * 1_000,
            period_ms: limit.refill_period_seconds as i64 * 1_000,
        }
    }
}

/// A bucket as the model keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bucket {
    tokens: i64,
    last_ms: i64,
    carry: i64,
}

impl Bucket {
    fn full(p: Params, now: i64) -> Self {
        Bucket {
            tokens: p.capacity,
            last_ms: now,
            carry: 0,
        }
    }

    /// Lazy refill: whole millitokens per elapsed millisecond, the remainder carried,
    /// nothing carried once full.
    fn refilled(mut self, p: Params, now: i64) -> Self {
        if now <= self.last_ms {
            self.tokens = self.tokens.min(p.capacity);
            return self;
        }
        let accrued = (now - self.last_ms) * p.amount + self.carry;
        let (add, carry) = (accrued / p.period_ms, accrued % p.period_ms);
        self.last_ms = now;
        if self.tokens + add >= p.capacity {
            self.tokens = p.capacity;
            self.carry = 0;
        } else {
            self.tokens += add;
            self.carry = carry;
        }
        self
    }

    /// Takes `milli` with no check (debt allowed); a refund stops at capacity.
    fn forced(self, p: Params, now: i64, milli: i64) -> Self {
        let mut next = self.refilled(p, now);
        next.tokens -= milli;
        if next.tokens >= p.capacity {
            next.tokens = p.capacity;
            next.carry = 0;
        }
        next
    }

    /// The least wait after which the bucket holds `wanted`; `None` if it never can.
    fn wait_for(self, p: Params, wanted: i64) -> Option<u64> {
        if wanted > p.capacity {
            return None;
        }
        let deficit = wanted - self.tokens;
        if deficit <= 0 {
            return Some(0);
        }
        let wait = (deficit * p.period_ms - self.carry + p.amount - 1).div_euclid(p.amount);
        Some(wait.max(0) as u64)
    }
}

/// A lease as the model keeps it: whole tokens per item and per limit of the item.
#[derive(Debug)]
struct ModelLease {
    items: Vec<usize>,
    /// The parameters each item's limits had when acquired: it settles at them.
    params: Vec<Vec<Params>>,
    written: Vec<Vec<i64>>,
    pending: Vec<Vec<i64>>,
    closed: bool,
}

/// The model: every entity's limits, and every bucket by entity and limit (its index in
/// the entity's limits).
struct Model {
    limits: [Vec<Limit>; 4],
    /// 0: every bucket exact. Otherwise a bucket may hold up to the refill over this many
    /// milliseconds more than the model after a step (DynamoDB's fresh-window bound), and
    /// the model takes the stored state from there.
    slack_ms: i64,
    /// Entities whose tokens are never taken or given back (counted only).
    bypassed: [bool; 4],
    /// Each bucket with the parameters it was last written at.
    buckets: BTreeMap<(usize, usize), (Bucket, Params)>,
}

/// The whole tokens an acquire or adjustment names for `limit` (names it lacks: none).
fn named(limit: &Limit, amounts: [i64; 2]) -> i64 {
    match limit.name.as_str() {
        "rpm" => amounts[0],
        "tpm" => amounts[1],
        _ => 0,
    }
}

impl Model {
    fn new(from: LimitsFrom, slack_ms: u32) -> Self {
        Model {
            limits: from.per_entity(),
            slack_ms: i64::from(slack_ms),
            bypassed: [
                false,
                false,
                matches!(from, LimitsFrom::StoredKidBypassed),
                false,
            ],
            buckets: BTreeMap::new(),
        }
    }

    fn params(&self, entity: usize, limit: usize) -> Params {
        Params::of(&self.limits[entity][limit])
    }

    /// The bucket at `now` as a write at parameters `p` finds it: refilled at the
    /// parameters it was written at, then (if they differ) taking `p`'s, its tokens cut to
    /// the new capacity and its carry dropped.
    fn bucket_at(&self, entity: usize, limit: usize, now: i64, p: Params) -> Bucket {
        match self.buckets.get(&(entity, limit)) {
            None => Bucket::full(p, now),
            Some(&(bucket, old)) => {
                let mut bucket = bucket.refilled(old, now);
                if old != p {
                    bucket.tokens = bucket.tokens.min(p.capacity);
                    bucket.carry = 0;
                }
                bucket
            }
        }
    }

    /// [`Self::bucket_at`] the entity's current parameters.
    fn bucket(&self, entity: usize, limit: usize, now: i64) -> Bucket {
        self.bucket_at(entity, limit, now, self.params(entity, limit))
    }

    fn force(&mut self, entity: usize, limit: usize, now: i64, tokens: i64, p: Params) {
        if self.bypassed[entity] {
            return;
        }
        let next = self
            .bucket_at(entity, limit, now, p)
            .forced(p, now, tokens * 1_000);
        self.buckets.insert((entity, limit), (next, p));
    }

    /// The items an acquire on `who` charges: a child charges its parent too.
    fn items(who: usize) -> Vec<usize> {
        match who {
            1 | 2 => vec![who, 3],
            _ => vec![who],
        }
    }

    /// All or nothing: the lease, or the violated (entity, limit) pairs and the wait.
    #[allow(clippy::type_complexity)]
    fn acquire(
        &mut self,
        who: usize,
        amounts: [i64; 2],
        now: i64,
    ) -> Result<ModelLease, (Vec<(usize, usize)>, Option<u64>)> {
        let items = Self::items(who);
        let mut violated = Vec::new();
        let mut wait = Some(0u64);
        for &entity in &items {
            for (limit, l) in self.limits[entity].iter().enumerate() {
                let wanted = named(l, amounts) * 1_000;
                let bucket = self.bucket(entity, limit, now);
                // A soft limit takes into debt rather than refuse; a bypass never refuses.
                if bucket.tokens < wanted && !l.soft && !self.bypassed[entity] {
                    violated.push((entity, limit));
                    let this = bucket.wait_for(Params::of(l), wanted);
                    wait = match (wait, this) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
            }
        }
        if !violated.is_empty() {
            // A rejection still stores new parameters, so they count from now.
            for &entity in &items {
                for limit in 0..self.limits[entity].len() {
                    let p = self.params(entity, limit);
                    if let Some(&(_, old)) = self.buckets.get(&(entity, limit)) {
                        if old != p {
                            let bucket = self.bucket(entity, limit, now);
                            self.buckets.insert((entity, limit), (bucket, p));
                        }
                    }
                }
            }
            return Err((violated, wait));
        }
        let mut written = Vec::new();
        let mut params = Vec::new();
        for &entity in &items {
            let mut taken = Vec::new();
            let mut at = Vec::new();
            for limit in 0..self.limits[entity].len() {
                let amount = named(&self.limits[entity][limit], amounts);
                let p = self.params(entity, limit);
                if !self.bypassed[entity] {
                    let mut bucket = self.bucket(entity, limit, now);
                    bucket.tokens -= amount * 1_000;
                    self.buckets.insert((entity, limit), (bucket, p));
                }
                taken.push(amount);
                at.push(p);
            }
            written.push(taken);
            params.push(at);
        }
        Ok(ModelLease {
            params,
            pending: written.iter().map(|w| vec![0; w.len()]).collect(),
            written,
            items,
            closed: false,
        })
    }

    /// Buffers deltas by name on every item with the limit: refused whole if any total
    /// would go below zero.
    fn adjust(&self, lease: &mut ModelLease, deltas: [i64; 2]) -> Result<(), &'static str> {
        if lease.closed {
            return Err("closed");
        }
        let mut next = lease.pending.clone();
        for (at, &entity) in lease.items.iter().enumerate() {
            for (limit, l) in self.limits[entity].iter().enumerate() {
                next[at][limit] += named(l, deltas);
                if lease.written[at][limit] + next[at][limit] < 0 {
                    return Err("refund beyond consumption");
                }
            }
        }
        lease.pending = next;
        Ok(())
    }

    /// Writes the pending adjustments and closes the lease.
    fn commit(&mut self, lease: &mut ModelLease, now: i64) -> Result<(), &'static str> {
        self.close(lease, now, true)
    }

    /// Gives back everything written and closes the lease (pending adjustments dropped).
    fn rollback(&mut self, lease: &mut ModelLease, now: i64) -> Result<(), &'static str> {
        self.close(lease, now, false)
    }

    fn close(
        &mut self,
        lease: &mut ModelLease,
        now: i64,
        commit: bool,
    ) -> Result<(), &'static str> {
        if lease.closed {
            return Err("closed");
        }
        for (at, &entity) in lease.items.iter().enumerate() {
            for limit in 0..lease.written[at].len() {
                let delta = if commit {
                    std::mem::take(&mut lease.pending[at][limit])
                } else {
                    -lease.written[at][limit]
                };
                if delta != 0 {
                    self.force(entity, limit, now, delta, lease.params[at][limit]);
                    lease.written[at][limit] += delta;
                }
            }
        }
        lease.closed = true;
        Ok(())
    }
}

/// Where a history went wrong: the step, what differed, and the history itself.
pub struct Mismatch {
    step: usize,
    what: String,
    history: Vec<Step>,
}

impl fmt::Debug for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "at step {}: {}", self.step, self.what)?;
        for (at, step) in self.history.iter().enumerate() {
            let mark = if at == self.step { "->" } else { "  " };
            writeln!(f, "{mark} {at:>3} {step:?}")?;
        }
        Ok(())
    }
}

/// The entity names of a history, under `prefix` so histories can share a table.
/// A step's acquire: by the limiter `by` picks, of `amounts` (rpm, tpm) from `entity`, at
/// the named limits when the history names them.
fn step_acquire(
    limiters: &[RateLimiter],
    by: u8,
    entity: &str,
    amounts: [i64; 2],
    explicit: Option<&[Limit; 2]>,
) -> zae_limiter::Acquire {
    let limiter = &limiters[usize::from(by) % limiters.len()];
    let acquire = limiter
        .acquire(entity, RESOURCE)
        .consume([("rpm", amounts[0]), ("tpm", amounts[1])]);
    match explicit {
        Some(limits) => acquire.limits(limits.clone()),
        None => acquire,
    }
}

fn names(prefix: &str) -> [String; 4] {
    ["solo", "kid-a", "kid-b", "proj"].map(|n| format!("{prefix}{n}"))
}

/// Creates the parent and its two cascading children, and stores the limits when they
/// come from the table.
pub async fn setup(limiter: &RateLimiter, prefix: &str, from: LimitsFrom) {
    let names = names(prefix);
    if !matches!(from, LimitsFrom::Explicit) {
        limiter
            .set_resource_limits(RESOURCE, &limits())
            .await
            .unwrap();
    }
    limiter.create_entity(names[3].clone()).await.unwrap();
    for kid in &names[1..3] {
        limiter
            .create_entity(kid.clone())
            .parent(names[3].clone())
            .cascade(true)
            .await
            .unwrap();
    }
    if !matches!(from, LimitsFrom::Explicit) {
        limiter
            .set_entity_limits(&names[3], RESOURCE, &from.parent_limits())
            .await
            .unwrap();
    }
    if let LimitsFrom::StoredKidBypassed = from {
        limiter.bypass_entity(&names[2], RESOURCE).await.unwrap();
    }
}

/// Runs `history` on `limiters` (one, or several processes' on one table; set up with
/// [`setup`] under `prefix`, all on `clock`), checking every step against the model (to
/// the millitoken, or within the refill over `slack_ms`, see [`Waits::Any`]); the first
/// difference is returned. A lease is settled through the limiter that acquired it.
/// Where a dropped lease or acquire settles in the background (DynamoDB), the state is
/// polled for up to 10 s for the give-back.
pub async fn run(
    limiters: &[RateLimiter],
    clock: &ManualClock,
    prefix: &str,
    from: LimitsFrom,
    slack_ms: u32,
    history: &[Step],
) -> Result<(), Mismatch> {
    let names = names(prefix);
    let mut model = Model::new(from, slack_ms);
    // Explicit limits are named on every acquire; stored ones are looked up.
    let mut explicit = matches!(from, LimitsFrom::Explicit).then(limits);
    let mut changed = false;
    let mut leases: Vec<(Lease, ModelLease)> = Vec::new();
    let fail = |step: usize, what: String| Mismatch {
        step,
        what,
        history: history.to_vec(),
    };
    for (at, step) in history.iter().enumerate() {
        let now = clock.now_ms();
        let mut eventually = false;
        // An acquire left running in the background: its write may land late.
        let mut in_flight = false;
        match step {
            Step::Wait { ms } => clock.advance(Duration::from_millis(u64::from(*ms))),
            Step::Reconfigure => {
                if let Some(explicit) = &mut explicit {
                    changed = !changed;
                    *explicit = reconfigured(changed);
                    model.limits = std::array::from_fn(|_| explicit.to_vec());
                }
            }
            Step::Acquire { by, who, rpm, tpm } => {
                let (who, amounts) = (usize::from(*who), [i64::from(*rpm), i64::from(*tpm)]);
                let got =
                    step_acquire(limiters, *by, &names[who], amounts, explicit.as_ref()).await;
                match (got, model.acquire(who, amounts, now)) {
                    (Ok(lease), Ok(expected)) => leases.push((lease, expected)),
                    (Err(Error::RateLimited(e)), Err((violated, wait))) => {
                        let mut got: Vec<(String, String)> = e
                            .violations()
                            .map(|s| (s.entity_id.clone(), s.limit.name.clone()))
                            .collect();
                        got.sort();
                        let mut expected: Vec<(String, String)> = violated
                            .iter()
                            .map(|&(e, l)| (names[e].clone(), model.limits[e][l].name.clone()))
                            .collect();
                        expected.sort();
                        if got != expected {
                            return Err(fail(
                                at,
                                format!("violations {got:?}, model {expected:?}"),
                            ));
                        }
                        let expected_wait = wait.map_or(Duration::MAX, Duration::from_millis);
                        if e.retry_after() != expected_wait {
                            return Err(fail(
                                at,
                                format!(
                                    "retry_after {:?}, model {expected_wait:?}",
                                    e.retry_after()
                                ),
                            ));
                        }
                    }
                    (got, expected) => {
                        return Err(fail(
                            at,
                            format!(
                                "acquire gave {:?}, model {:?}",
                                got.map(|_| "a lease"),
                                expected.map(|_| "a lease").map_err(|(v, _)| v)
                            ),
                        ))
                    }
                }
            }
            Step::Adjust {
                lease,
                rpm,
                tpm,
                handle,
            } => {
                if let Some((lease, expected)) = pick(&mut leases, *lease) {
                    let deltas = [i64::from(*rpm), i64::from(*tpm)];
                    let named: Vec<(&str, i64)> = [("rpm", deltas[0]), ("tpm", deltas[1])]
                        .into_iter()
                        .filter(|(_, d)| *d != 0)
                        .collect();
                    let got = if *handle {
                        lease.handle().adjust(named)
                    } else {
                        lease.adjust(named).await
                    };
                    let want = model.adjust(expected, deltas);
                    if got.is_ok() != want.is_ok() {
                        return Err(fail(at, format!("adjust gave {got:?}, model {want:?}")));
                    }
                }
            }
            Step::Commit { lease } => {
                if let Some((lease, expected)) = pick(&mut leases, *lease) {
                    let got = lease.commit().await;
                    let want = model.commit(expected, now);
                    same_close(&got, &want).map_err(|w| fail(at, format!("commit: {w}")))?;
                }
            }
            Step::Rollback { lease } => {
                if let Some((lease, expected)) = pick(&mut leases, *lease) {
                    let got = lease.rollback().await;
                    let want = model.rollback(expected, now);
                    same_close(&got, &want).map_err(|w| fail(at, format!("rollback: {w}")))?;
                }
            }
            Step::Drop { lease } => {
                if !leases.is_empty() {
                    let at_index = usize::from(*lease) % leases.len();
                    let (lease, mut expected) = leases.swap_remove(at_index);
                    drop(lease);
                    // Dropped open: rolled back, at this time (the clock stands still).
                    let _ = model.rollback(&mut expected, now);
                    eventually = true;
                }
            }
            Step::Abandon { by, who, rpm, tpm } => {
                let (who, amounts) = (usize::from(*who), [i64::from(*rpm), i64::from(*tpm)]);
                let acquire = step_acquire(limiters, *by, &names[who], amounts, explicit.as_ref());
                let future = acquire.into_future();
                // Polled once, then dropped with whatever it decided: nothing stays taken,
                // but the buckets it wrote are stored (at this acquire's parameters).
                let decided = futures_util::FutureExt::now_or_never(future);
                if let Ok(mut lease) = model.acquire(who, amounts, now) {
                    let _ = model.rollback(&mut lease, now);
                }
                if decided.is_none() {
                    // The acquire goes on in the background and rolls back once admitted:
                    // give it time to land before waiting for the give-back.
                    tokio::time::sleep(Duration::from_millis(1_000)).await;
                    eventually = true;
                    in_flight = true;
                }
            }
        }
        tokio::task::yield_now().await;
        let now = clock.now_ms();
        let mut tries = 0;
        loop {
            match compare(&limiters[0], &names, &mut model, now).await {
                // Matching before a late write lands would pass it by: it must hold on.
                Ok(()) if in_flight => {
                    in_flight = false;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(()) => break,
                Err(_) if eventually && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(what) => return Err(fail(at, what)),
            }
        }
    }
    // Whatever is still open is rolled back: everything taken comes back.
    for (lease, mut expected) in leases {
        let now = clock.now_ms();
        let got = lease.rollback().await;
        let want = model.rollback(&mut expected, now);
        same_close(&got, &want).map_err(|w| fail(history.len(), format!("final rollback: {w}")))?;
    }
    let now = clock.now_ms();
    compare(&limiters[0], &names, &mut model, now)
        .await
        .map_err(|what| fail(history.len(), format!("after the final rollbacks: {what}")))
}

/// The lease a step names (modulo the leases held), with its model.
fn pick(leases: &mut [(Lease, ModelLease)], index: u8) -> Option<&mut (Lease, ModelLease)> {
    if leases.is_empty() {
        return None;
    }
    let at = usize::from(index) % leases.len();
    leases.get_mut(at)
}

/// A commit or rollback and the model agree: both done, or both refused as closed.
fn same_close(got: &Result<(), Error>, want: &Result<(), &str>) -> Result<(), String> {
    match (got, want) {
        (Ok(()), Ok(())) | (Err(Error::LeaseClosed), Err(_)) => Ok(()),
        _ => Err(format!("gave {got:?}, model {want:?}")),
    }
}

/// Every bucket of the history's entities, as stored and refilled to `now` by the model's
/// rule, against the model's: tokens and carry exact.
async fn compare(
    limiter: &RateLimiter,
    names: &[String; 4],
    model: &mut Model,
    now: i64,
) -> Result<(), String> {
    for (entity, name) in names.iter().enumerate() {
        let stored = limiter
            .bucket_states(name, RESOURCE)
            .await
            .map_err(|e| format!("bucket_states({name}): {e}"))?;
        if let Some(extra) = stored
            .keys()
            .find(|k| !model.limits[entity].iter().any(|l| &l.name == *k))
        {
            return Err(format!(
                "{name} has a bucket for {extra}, which none of its limits names"
            ));
        }
        for (limit, l) in model.limits[entity].iter().enumerate() {
            // Each refilled at the parameters it was written at, which must agree.
            let modelled = model.buckets.get(&(entity, limit)).copied();
            let Some(state) = stored.get(&l.name) else {
                // Not stored (never written, or evicted once idle and full): the model's
                // must be full, and is forgotten too (the next write starts a fresh one at
                // its own parameters).
                if let Some((bucket, p)) = modelled {
                    let bucket = bucket.refilled(p, now);
                    if bucket.tokens != p.capacity {
                        return Err(format!(
                            "{name} {}: not stored, model {} of {} millitokens",
                            l.name, bucket.tokens, p.capacity
                        ));
                    }
                    model.buckets.remove(&(entity, limit));
                }
                continue;
            };
            let at = params_of(state);
            let got = from_stored(state).refilled(at, now);
            let (want, p) = match modelled {
                Some((bucket, p)) => (bucket.refilled(p, now), p),
                None => (Bucket::full(at, now), at),
            };
            if at != p {
                return Err(format!(
                    "{name} {}: stored at {at:?}, model at {p:?}",
                    l.name
                ));
            }
            if model.slack_ms == 0 {
                if (got.tokens, got.carry) != (want.tokens, want.carry) {
                    return Err(format!(
                        "{name} {}: stored {} millitokens (carry {}), model {} (carry {})",
                        l.name, got.tokens, got.carry, want.tokens, want.carry
                    ));
                }
                continue;
            }
            // Never fewer tokens than exact (nothing lost), and more only by the refill
            // over the window; the model goes on from what is stored.
            let slack = (model.slack_ms * p.amount + p.period_ms - 1) / p.period_ms;
            if got.tokens < want.tokens || got.tokens > want.tokens + slack {
                return Err(format!(
                    "{name} {}: stored {} millitokens, model {} (up to {slack} more allowed)",
                    l.name, got.tokens, want.tokens
                ));
            }
            model.buckets.insert((entity, limit), (got, p));
        }
    }
    Ok(())
}

fn params_of(state: &BucketState) -> Params {
    Params {
        capacity: state.capacity_milli,
        amount: state.refill_amount_milli,
        period_ms: state.refill_period_ms,
    }
}

fn from_stored(state: &BucketState) -> Bucket {
    Bucket {
        tokens: state.tokens_milli,
        last_ms: state.last_refill_ms,
        carry: state.refill_carry,
    }
}
