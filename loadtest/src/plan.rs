//! Who follows what, and which post goes where.
//!
//! Channel popularity follows a Zipf law: channel `r` (0-based rank) has weight
//! `1 / (r + 1)^s`. Each follower picks `follows` distinct channels by weight,
//! so a few channels are huge and the rest form a long tail. Posts go to the
//! channels round-robin, so every channel gets posts. The plan is
//! deterministic for a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The assignment of followers to channels and of posts to channels.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Per follower, the channel indexes it follows.
    pub follows: Vec<Vec<usize>>,
    /// Per channel, how many followers it has.
    pub followers_per_channel: Vec<u64>,
    /// Per channel, how many posts it gets.
    pub posts_per_channel: Vec<u64>,
}

impl Plan {
    /// Draws the plan.
    pub fn new(
        followers: usize,
        channels: usize,
        follows: usize,
        posts: usize,
        s: f64,
        seed: u64,
    ) -> Plan {
        let channels = channels.max(1);
        let k = follows.clamp(1, channels);
        let cdf = zipf_cdf(channels, s);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut followers_per_channel = vec![0u64; channels];
        let mut all = Vec::with_capacity(followers);
        for _ in 0..followers {
            let mut mine: Vec<usize> = Vec::with_capacity(k);
            // Bounded rejection sampling; fill with the most popular unpicked
            // channels if the draws keep repeating.
            for _ in 0..k * 32 {
                if mine.len() == k {
                    break;
                }
                let c = sample(&cdf, rng.random::<f64>());
                if !mine.contains(&c) {
                    mine.push(c);
                }
            }
            for c in 0..channels {
                if mine.len() == k {
                    break;
                }
                if !mine.contains(&c) {
                    mine.push(c);
                }
            }
            for &c in &mine {
                followers_per_channel[c] += 1;
            }
            all.push(mine);
        }
        let posts_per_channel = (0..channels)
            .map(|c| (posts / channels + usize::from(c < posts % channels)) as u64)
            .collect();
        Plan {
            follows: all,
            followers_per_channel,
            posts_per_channel,
        }
    }

    /// The channel post number `i` (0-based) goes to.
    pub fn channel_of_post(&self, i: usize) -> usize {
        i % self.posts_per_channel.len()
    }

    /// Deliveries the run expects: every follower gets every post of its channels.
    pub fn expected_deliveries(&self) -> u64 {
        self.followers_per_channel
            .iter()
            .zip(&self.posts_per_channel)
            .map(|(f, p)| f * p)
            .sum()
    }
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (0..n).map(|r| 1.0 / ((r + 1) as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

fn sample(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skewed_distinct_and_complete() {
        let p = Plan::new(10_000, 100, 3, 250, 1.0, 7);
        assert!(p.follows.iter().all(|f| {
            let mut g = f.clone();
            g.sort();
            g.dedup();
            g.len() == 3
        }));
        assert_eq!(p.followers_per_channel.iter().sum::<u64>(), 30_000);
        // The top channel is far bigger than the median one.
        assert!(p.followers_per_channel[0] > 10 * p.followers_per_channel[50]);
        assert_eq!(p.posts_per_channel.iter().sum::<u64>(), 250);
        assert_eq!(p.posts_per_channel[0], 3);
        assert_eq!(p.posts_per_channel[99], 2);
    }

    #[test]
    fn one_channel_everyone_follows_it() {
        let p = Plan::new(10, 1, 3, 5, 1.0, 1);
        assert!(p.follows.iter().all(|f| f == &vec![0]));
        assert_eq!(p.expected_deliveries(), 50);
    }
}
