//! Zone-aware routing with spillover, and priority failover between zone groups.
//!
//! Reference: Envoy's zone-aware routing (`ZoneAwareLoadBalancerBase`,
//! `regenerateLocalityRoutingStructures` / `tryChooseLocalLocalityHosts`) and its
//! priority levels with the overprovisioning factor (`recalculatePerPriorityState`,
//! `distributeLoad`). Results are shares in millionths ([`PPM`]) that sum to exactly
//! 1,000,000, and [`Split::pick`] draws one index from them.
//!
//! **Zones** ([`zone_split`]). Zone z has healthy capacity cap_z (sum of the weights of
//! its routable instances) and demand dem_z (the share of *this* proxy fleet running
//! in z; equal for every zone unless given). With C = Σcap, D = Σdem and the local
//! zone l:
//!
//! ```text
//! if cap_l/C ≥ dem_l/D:  local = 100%                      (all requests stay in-zone)
//! else:                  local = (cap_l/C) / (dem_l/D)       (the share the zone can take)
//!                        residual_z = max(0, cap_z/C − dem_z/D) for z ≠ l
//!                        share_z = (100% − local) · residual_z / Σ residual
//! ```
//!
//! So each proxy keeps what its zone can absorb given that every zone's proxies do
//! the same, and spills the rest to the zones with spare capacity in proportion to
//! that spare capacity. With no spare capacity anywhere (only through rounding), the
//! spill goes in proportion to capacity. Envoy's early exits become: fewer than two
//! zones with capacity, an unknown local zone, or a local zone with no capacity →
//! shares in proportion to capacity (no zone preference). Arithmetic is exact
//! (u128 rationals, then floors); the few millionths lost to floors go to the zone
//! with the largest residual.
//!
//! **Priorities** ([`priority_split`]). Zones (or regions) grouped into an ordered
//! priority list, level p with healthy and total weight h_p, t_p and the
//! overprovisioning factor o (140%):
//!
//! ```text
//! health_p = min(100%, o · h_p / t_p)
//! N        = min(100%, Σ health_p)
//! load_p   = min(100% − Σ_{q<p} load_q, health_p / N)        (remainder → first healthy level)
//! ```
//!
//! Level 0 takes everything while at least 1/o ≈ 71.4% of it is healthy; below that
//! the next levels take the difference, and when every level is degraded the load
//! is spread in proportion to health. Zone-aware routing then applies inside the
//! chosen level. Left out: Envoy's `min_cluster_size`, degraded hosts, panic
//! thresholds, `locality_weighted_lb_config`, and runtime overrides.

use crate::rng::Rng;

/// Shares are in millionths.
pub const PPM: u32 = 1_000_000;
/// Envoy's default overprovisioning factor, in percent.
pub const DEFAULT_OVERPROVISIONING_PERCENT: u32 = 140;

/// Shares per index, in millionths; they sum to [`PPM`] unless all are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    ppm: Vec<u32>,
}

impl Split {
    pub fn shares_ppm(&self) -> &[u32] {
        &self.ppm
    }

    /// An index drawn with probability share/10⁶; `None` when every share is 0.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<usize> {
        let total: u64 = self.ppm.iter().map(|&p| u64::from(p)).sum();
        if total == 0 {
            return None;
        }
        let mut r = rng.below(total);
        for (i, &p) in self.ppm.iter().enumerate() {
            if r < u64::from(p) {
                return Some(i);
            }
            r -= u64::from(p);
        }
        None
    }
}

/// Per-zone shares of this proxy's requests. `capacity[z]` is zone z's healthy
/// weight, `local` the proxy's own zone, `demand[z]` the proxy fleet per zone
/// (`None`, or a slice of another length: equal demand in every zone).
pub fn zone_split(local: Option<usize>, capacity: &[u64], demand: Option<&[u64]>) -> Split {
    let capacity = &fit32(capacity);
    let demand = demand.map(fit32);
    let demand = demand.as_deref();
    let n = capacity.len();
    let c_total: u128 = capacity.iter().map(|&c| u128::from(c)).sum();
    if c_total == 0 {
        return Split { ppm: vec![0; n] };
    }
    let zones_with_capacity = capacity.iter().filter(|&&c| c > 0).count();
    let local = match local {
        Some(l) if zones_with_capacity >= 2 && capacity.get(l).is_some_and(|&c| c > 0) => l,
        // Envoy's early exits: no zone preference.
        _ => return proportional(capacity),
    };
    let dem: Vec<u128> = match demand {
        Some(d) if d.len() == n && d.iter().any(|&x| x > 0) => {
            d.iter().map(|&x| u128::from(x)).collect()
        }
        _ => vec![1; n],
    };
    let d_total: u128 = dem.iter().sum();
    let cap = |z: usize| capacity.get(z).map_or(0, |&c| u128::from(c));
    let dem_of = |z: usize| dem.get(z).copied().unwrap_or(0);
    let (cap_l, dem_l) = (cap(local), dem_of(local));
    let mut ppm = vec![0u32; n];
    // cap_l/C ≥ dem_l/D  ⇔  cap_l·D ≥ dem_l·C.
    if cap_l * d_total >= dem_l * c_total {
        if let Some(p) = ppm.get_mut(local) {
            *p = PPM;
        }
        return Split { ppm };
    }
    let local_ppm = (u128::from(PPM) * cap_l * d_total / (dem_l * c_total)) as u32;
    // residual_z scaled by C·D: cap_z·D − dem_z·C.
    let residual: Vec<u128> = (0..n)
        .map(|z| {
            if z == local {
                0
            } else {
                (cap(z) * d_total).saturating_sub(dem_of(z) * c_total)
            }
        })
        .collect();
    let spill = u128::from(PPM - local_ppm);
    let weights: Vec<u128> = if residual.iter().any(|&r| r > 0) {
        residual
    } else {
        (0..n)
            .map(|z| if z == local { 0 } else { cap(z) })
            .collect()
    };
    let w_total: u128 = weights.iter().sum();
    for (z, p) in ppm.iter_mut().enumerate() {
        let w = weights.get(z).copied().unwrap_or(0);
        *p = (spill * w).checked_div(w_total).unwrap_or(0) as u32;
    }
    if let Some(p) = ppm.get_mut(local) {
        *p = local_ppm;
    }
    settle(&mut ppm, &weights);
    Split { ppm }
}

/// Shares per priority level from `(healthy weight, total weight)` per level.
/// `overprovisioning_percent` is Envoy's overprovisioning factor (140 = 1.4).
pub fn priority_split(levels: &[(u64, u64)], overprovisioning_percent: u32) -> Split {
    let over = u128::from(overprovisioning_percent.min(100_000));
    let health: Vec<u128> = levels
        .iter()
        .map(|&(healthy, total)| {
            if total == 0 {
                return 0;
            }
            let h = u128::from(healthy.min(total));
            (over * h * u128::from(PPM) / (100 * u128::from(total))).min(u128::from(PPM))
        })
        .collect();
    let normalized = health.iter().sum::<u128>().min(u128::from(PPM));
    let mut ppm = vec![0u32; levels.len()];
    if normalized == 0 {
        return Split { ppm };
    }
    let mut remaining = u128::from(PPM);
    for (p, &h) in ppm.iter_mut().zip(&health) {
        let load = (h * u128::from(PPM) / normalized).min(remaining);
        *p = load as u32;
        remaining -= load;
    }
    if remaining > 0 {
        if let Some(i) = health.iter().position(|&h| h > 0) {
            if let Some(p) = ppm.get_mut(i) {
                *p += remaining as u32;
            }
        }
    }
    Split { ppm }
}

/// Per-zone shares with priority failover: zone z belongs to priority level
/// `level[z]`; `capacity[z]` is its healthy weight and `total[z]` its weight with
/// unhealthy and ejected instances counted. Levels share the load by
/// [`priority_split`] on `(Σ capacity, Σ total)` per level; inside a level, zones
/// share it by [`zone_split`] (with the local zone if it is in that level, else in
/// proportion to capacity). A zone's share is the product, floored; the millionths
/// lost go to the zone with the largest share.
pub fn failover_split(
    local: Option<usize>,
    level: &[usize],
    capacity: &[u64],
    total: &[u64],
    overprovisioning_percent: u32,
) -> Split {
    let n = capacity.len();
    let levels = level.iter().copied().max().map_or(0, |m| m + 1);
    let mut per_level = vec![(0u64, 0u64); levels];
    for z in 0..n {
        if let (Some(&l), Some(&c), Some(&t)) = (level.get(z), capacity.get(z), total.get(z)) {
            if let Some(x) = per_level.get_mut(l) {
                x.0 = x.0.saturating_add(c);
                x.1 = x.1.saturating_add(t.max(c));
            }
        }
    }
    let level_split = priority_split(&per_level, overprovisioning_percent);
    let mut ppm = vec![0u32; n];
    for (l, &lp) in level_split.ppm.iter().enumerate() {
        if lp == 0 {
            continue;
        }
        let zones: Vec<usize> = (0..n).filter(|&z| level.get(z) == Some(&l)).collect();
        let caps: Vec<u64> = zones
            .iter()
            .map(|&z| capacity.get(z).copied().unwrap_or(0))
            .collect();
        let local_here = local.and_then(|lz| zones.iter().position(|&z| z == lz));
        let inner = zone_split(local_here, &caps, None);
        for (k, &z) in zones.iter().enumerate() {
            let share = inner.ppm.get(k).copied().unwrap_or(0);
            if let Some(p) = ppm.get_mut(z) {
                *p = (u64::from(lp) * u64::from(share) / u64::from(PPM)) as u32;
            }
        }
    }
    if ppm.iter().any(|&p| p > 0) {
        let w: Vec<u128> = ppm.iter().map(|&p| u128::from(p)).collect();
        settle(&mut ppm, &w);
    }
    Split { ppm }
}

/// The values shifted right together until the largest fits in 32 bits, so the
/// products above stay far inside u128 whatever the caller passes (ratios kept to
/// 32 significant bits).
fn fit32(values: &[u64]) -> Vec<u64> {
    let max = values.iter().copied().max().unwrap_or(0);
    let shift = 64u32.saturating_sub(max.leading_zeros()).saturating_sub(32);
    values.iter().map(|&v| v >> shift).collect()
}

/// Shares in proportion to `weights`.
fn proportional(weights: &[u64]) -> Split {
    let w: Vec<u128> = weights.iter().map(|&x| u128::from(x)).collect();
    let total: u128 = w.iter().sum();
    let mut ppm: Vec<u32> = w
        .iter()
        .map(|&x| (u128::from(PPM) * x).checked_div(total).unwrap_or(0) as u32)
        .collect();
    if total > 0 {
        settle(&mut ppm, &w);
    }
    Split { ppm }
}

/// Gives what floors lost (a few millionths) to the index of the largest weight.
fn settle(ppm: &mut [u32], weights: &[u128]) {
    let sum: u64 = ppm.iter().map(|&p| u64::from(p)).sum();
    let missing = u64::from(PPM).saturating_sub(sum) as u32;
    if missing == 0 {
        return;
    }
    let mut best: Option<(usize, u128)> = None;
    for (i, &w) in weights.iter().enumerate() {
        if best.map_or(true, |(_, bw)| w > bw) {
            best = Some((i, w));
        }
    }
    if let Some(p) = best.and_then(|(i, _)| ppm.get_mut(i)) {
        *p += missing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// The doc comment's formula in floating point, as the reference.
    fn formula(local: usize, cap: &[f64], dem: &[f64]) -> Vec<f64> {
        let (c, d): (f64, f64) = (cap.iter().sum(), dem.iter().sum());
        let (cs, ds): (Vec<f64>, Vec<f64>) = (
            cap.iter().map(|x| x / c).collect(),
            dem.iter().map(|x| x / d).collect(),
        );
        let mut out = vec![0.0; cap.len()];
        if cs[local] >= ds[local] {
            out[local] = 1.0;
            return out;
        }
        out[local] = cs[local] / ds[local];
        let res: Vec<f64> = (0..cap.len())
            .map(|z| {
                if z == local {
                    0.0
                } else {
                    (cs[z] - ds[z]).max(0.0)
                }
            })
            .collect();
        let r: f64 = res.iter().sum();
        for z in 0..cap.len() {
            if z != local {
                out[z] = (1.0 - out[local]) * res[z] / r;
            }
        }
        out
    }

    fn check(local: usize, cap: &[u64], dem: Option<&[u64]>) -> Vec<u32> {
        let s = zone_split(Some(local), cap, dem);
        let capf: Vec<f64> = cap.iter().map(|&x| x as f64).collect();
        let demf: Vec<f64> = dem.map_or(vec![1.0; cap.len()], |d| {
            d.iter().map(|&x| x as f64).collect()
        });
        let want = formula(local, &capf, &demf);
        for (z, (&got, want)) in s.shares_ppm().iter().zip(&want).enumerate() {
            assert!(
                (f64::from(got) - want * 1e6).abs() <= 3.0,
                "zone {z}: {got} vs {want}"
            );
        }
        assert_eq!(s.shares_ppm().iter().sum::<u32>(), PPM);
        s.shares_ppm().to_vec()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn enough_local_capacity_keeps_everything_in_zone() {
        // Local zone b has 50% of capacity for 33% of demand.
        assert_eq!(check(1, &[20, 50, 30], None), vec![0, PPM, 0]);
        // Exactly its share: still all local.
        assert_eq!(check(0, &[10, 10, 10], None), vec![PPM, 0, 0]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn spillover_follows_the_formula() {
        // a has 10% capacity for 1/3 of demand: keeps 30%, spills 70% evenly to b and c.
        assert_eq!(
            check(0, &[10, 45, 45], None),
            vec![300_000, 350_000, 350_000]
        );
        // a: 20% for 1/3 → 60% local; only b has spare capacity (50% > 33%), c has none.
        assert_eq!(check(0, &[20, 50, 30], None), vec![600_000, 400_000, 0]);
        // Uneven residuals: a 10%, b 50% (spare 16.7%), c 40% (spare 6.7%): 30% local,
        // 70% split 5:2 → 50% and 20%.
        assert_eq!(
            check(0, &[10, 50, 40], None),
            vec![300_000, 500_000, 200_000]
        );
        // Given demand: half the proxies in a, which has 25% of capacity: keep 50%.
        let s = check(0, &[25, 50, 25], Some(&[2, 1, 1]));
        assert_eq!(s[0], 500_000);
        // Four zones, odd numbers: within 3 ppm of the formula, summing to 10⁶.
        check(2, &[7, 13, 3, 11], None);
        check(1, &[1_000, 1, 999, 5], Some(&[3, 5, 7, 11]));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn failover_keeps_the_local_region_until_it_is_degraded() {
        // Region 0 = zones a, b (local a); region 1 = zones c, d; all healthy: a keeps all.
        let levels = [0, 0, 1, 1];
        assert_eq!(
            failover_split(Some(0), &levels, &[10, 10, 10, 10], &[10, 10, 10, 10], 140)
                .shares_ppm(),
            &[PPM, 0, 0, 0]
        );
        // a lost 8 of 10: region 0 health = 1.4·12/20 = 84 %, region 1 takes 16 %
        // (8 % per zone); inside region 0, a keeps (2/12)/(1/2) = 1/3 of 84 %, b the rest.
        assert_eq!(
            failover_split(Some(0), &levels, &[2, 10, 10, 10], &[10, 10, 10, 10], 140).shares_ppm(),
            &[279_999, 560_001, 80_000, 80_000]
        );
        // Still 75 % healthy in region 0 (≥ 1/1.4): no failover, only zone spill.
        assert_eq!(
            failover_split(Some(0), &levels, &[5, 10, 10, 10], &[10, 10, 10, 10], 140).shares_ppm(),
            &[666_666, 333_334, 0, 0]
        );
        // Region 0 gone: region 1 in proportion to capacity.
        assert_eq!(
            failover_split(Some(0), &levels, &[0, 0, 10, 30], &[10, 10, 10, 30], 140).shares_ppm(),
            &[0, 0, 250_000, 750_000]
        );
        // One level, no local zone: in proportion to capacity.
        assert_eq!(
            failover_split(None, &[0, 0], &[1, 3], &[1, 3], 140).shares_ppm(),
            &[250_000, 750_000]
        );
        // Nothing healthy anywhere.
        assert_eq!(
            failover_split(Some(0), &levels, &[0, 0, 0, 0], &[1, 1, 1, 1], 140)
                .pick(&mut SplitMix64(1)),
            None
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn early_exits_share_by_capacity() {
        let s = zone_split(None, &[1, 3], None);
        assert_eq!(s.shares_ppm(), &[250_000, 750_000]);
        // Local zone without capacity.
        assert_eq!(
            zone_split(Some(0), &[0, 1, 3], None).shares_ppm(),
            &[0, 250_000, 750_000]
        );
        // Only one zone has capacity.
        assert_eq!(zone_split(Some(1), &[0, 5], None).shares_ppm(), &[0, PPM]);
        // Nothing at all.
        assert_eq!(
            zone_split(Some(0), &[0, 0], None).pick(&mut SplitMix64(1)),
            None
        );
        // Demand of the wrong length is ignored (equal demand).
        assert_eq!(
            zone_split(Some(0), &[10, 45, 45], Some(&[1])).shares_ppm(),
            &[300_000, 350_000, 350_000]
        );
        // Huge inputs do not overflow: scaled to 32 bits, same shares.
        let big = [10 << 40, 45 << 40, 45 << 40];
        assert_eq!(
            zone_split(Some(0), &big, Some(&[u64::MAX, u64::MAX, u64::MAX])).shares_ppm(),
            &[300_000, 350_000, 350_000]
        );
        assert_eq!(
            priority_split(&[(u64::MAX / 2, u64::MAX)], u32::MAX).shares_ppm(),
            &[PPM]
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn picks_follow_the_shares() {
        let s = zone_split(Some(0), &[10, 45, 45], None);
        let mut rng = SplitMix64(6);
        let mut c = [0u32; 3];
        for _ in 0..100_000 {
            c[s.pick(&mut rng).unwrap()] += 1;
        }
        assert!((29_300..30_700).contains(&c[0]), "{c:?}");
        assert!((34_300..35_700).contains(&c[1]), "{c:?}");
        // Pinned draws: integer-only, so every target picks the same.
        let mut rng = SplitMix64(6);
        let seq: Vec<usize> = (0..10).map(|_| s.pick(&mut rng).unwrap()).collect();
        assert_eq!(seq, PINNED);
    }
    const PINNED: [usize; 10] = [2, 1, 0, 0, 1, 2, 0, 0, 0, 2];

    #[wasm_bindgen_test(unsupported = test)]
    fn priority_failover_with_overprovisioning() {
        let p = |levels: &[(u64, u64)]| {
            priority_split(levels, DEFAULT_OVERPROVISIONING_PERCENT)
                .shares_ppm()
                .to_vec()
        };
        // All healthy: level 0 takes everything.
        assert_eq!(p(&[(10, 10), (10, 10)]), vec![PPM, 0]);
        // 80% healthy × 1.4 = 112% → still everything.
        assert_eq!(p(&[(8, 10), (10, 10)]), vec![PPM, 0]);
        // 70% × 1.4 = 98%: 2% fails over.
        assert_eq!(p(&[(7, 10), (10, 10)]), vec![980_000, 20_000]);
        // 50% → 70% / 30%.
        assert_eq!(p(&[(5, 10), (10, 10)]), vec![700_000, 300_000]);
        // Both 20% healthy: 28% + 28% = 56% total health, normalised to 50/50.
        assert_eq!(p(&[(2, 10), (2, 10)]), vec![500_000, 500_000]);
        // Three levels, the first dead.
        assert_eq!(p(&[(0, 10), (3, 10), (10, 10)]), vec![0, 420_000, 580_000]);
        // Nothing healthy anywhere.
        assert_eq!(p(&[(0, 10), (0, 0)]), vec![0, 0]);
        // Total health above 100%: levels fill in order (46.7% + 46.7% + the rest).
        assert_eq!(p(&[(1, 3), (1, 3), (1, 3)]), vec![466_666, 466_666, 66_668]);
        // Rounding remainder goes to the first healthy level: 20% health each → 1/3.
        assert_eq!(
            p(&[(0, 0), (1, 7), (1, 7), (1, 7)]),
            vec![0, 333_334, 333_333, 333_333]
        );
    }
}
