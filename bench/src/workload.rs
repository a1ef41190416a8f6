//! YCSB-style workloads: which operation comes next, on which key, with
//! which value.
//!
//! | workload | reads | updates | notes                           |
//! |----------|-------|---------|---------------------------------|
//! | `load`   | 0%    | 100%    | inserts record 0, 1, 2, ... once |
//! | `a`      | 50%   | 50%     | update heavy                    |
//! | `b`      | 95%   | 5%      | read mostly                     |
//! | `c`      | 100%  | 0%      | read only                       |
//! | `w`      | 0%    | 100%    | write only, chosen keys         |
//!
//! Keys are `user` followed by the record number, zero-padded, so every
//! target stores the same key bytes. The zipfian chooser is YCSB's (Gray et
//! al., constant 0.99) with the record number scrambled by a hash, so the hot
//! keys are spread over the key space instead of bunched at its start.

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Load,
    A,
    B,
    C,
    W,
}

impl Workload {
    /// Fraction of operations that are reads.
    pub fn read_fraction(self) -> f64 {
        match self {
            Workload::Load | Workload::W => 0.0,
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipfian,
}

/// The kind of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Update,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
        }
    }
}

/// The record number's key.
pub fn key(record: u64) -> Vec<u8> {
    format!("user{record:012}").into_bytes()
}

/// A value size: fixed, or uniform in an inclusive range (`100` or `100..1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ValueSize {
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for ValueSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("value size `{s}`: expected N or MIN..MAX bytes"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min > max {
            return Err(format!("value size `{s}`: MIN exceeds MAX"));
        }
        Ok(ValueSize { min, max })
    }
}

/// YCSB's zipfian generator over `0..n`.
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    pub const THETA: f64 = 0.99;

    pub fn new(n: u64) -> Self {
        let theta = Self::THETA;
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2.min(n));
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipfian {
            n,
            theta,
            alpha,
            zetan,
            eta,
        }
    }

    /// A rank: 0 is the most popular.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// FNV-1a: scrambles zipfian ranks over the record space.
fn scramble(rank: u64, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rank.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % n
}

/// Chooses each operation of a run.
#[derive(Debug, Clone)]
pub struct Chooser {
    workload: Workload,
    records: u64,
    zipf: Option<Zipfian>,
    value: ValueSize,
}

impl Chooser {
    pub fn new(workload: Workload, records: u64, dist: Distribution, value: ValueSize) -> Self {
        let zipf = (dist == Distribution::Zipfian && records > 0).then(|| Zipfian::new(records));
        Chooser {
            workload,
            records: records.max(1),
            zipf,
            value,
        }
    }

    /// The `seq`-th operation: its kind and record.
    pub fn op(&self, seq: u64, rng: &mut impl Rng) -> (Op, u64) {
        if self.workload == Workload::Load {
            return (Op::Update, seq % self.records);
        }
        let op = if rng.gen_bool(self.workload.read_fraction()) {
            Op::Read
        } else {
            Op::Update
        };
        let record = match &self.zipf {
            Some(z) => scramble(z.next(rng), self.records),
            None => rng.gen_range(0..self.records),
        };
        (op, record)
    }

    pub fn value(&self, rng: &mut impl Rng) -> Vec<u8> {
        let len = rng.gen_range(self.value.min..=self.value.max);
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_and_sizes_follow_the_workload() {
        let mut rng = rand::thread_rng();
        let c = Chooser::new(
            Workload::B,
            1000,
            Distribution::Uniform,
            "10..20".parse().unwrap(),
        );
        let reads = (0..10_000)
            .filter(|i| c.op(*i, &mut rng).0 == Op::Read)
            .count();
        assert!((9_300..9_700).contains(&reads), "{reads}");
        let v = c.value(&mut rng);
        assert!((10..=20).contains(&v.len()));
        let load = Chooser::new(
            Workload::Load,
            5,
            Distribution::Uniform,
            "1".parse().unwrap(),
        );
        assert_eq!(load.op(7, &mut rng), (Op::Update, 2));
        assert!("5..1".parse::<ValueSize>().is_err());
    }

    #[test]
    fn zipfian_is_skewed_and_in_range() {
        let mut rng = rand::thread_rng();
        let z = Zipfian::new(100_000);
        let draws: Vec<u64> = (0..100_000).map(|_| z.next(&mut rng)).collect();
        assert!(draws.iter().all(|r| *r < 100_000));
        let top = draws.iter().filter(|r| **r == 0).count();
        assert!(top > 3_000, "rank 0 drawn {top} times");
    }
}
