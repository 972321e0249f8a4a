//! Metadata subsets: route a request to the instances whose metadata match a selector.
//!
//! Reference: Envoy's subset load balancer (`lb_subset_config`). Instances carry
//! metadata as key/value pairs (registry metadata, Consul tags as `tag:<t>` = "").
//! A selector is a set of pairs; an instance matches when it has every pair.
//!
//! - **Subsets are precomputed** for the configured key sets (Envoy's
//!   `subset_selectors`): for each key set, instances are grouped by their values of
//!   those keys, so a request's selector is one hash-map lookup, O(1) in the number
//!   of instances. A selector whose key set is not configured matches no subset
//!   (Envoy's behaviour): a client sending a header cannot probe arbitrary metadata.
//!   With no key sets configured at all, any selector is allowed and evaluated by a
//!   scan (for small pools; the result is owned).
//! - **Selector text** ([`parse_selector`]), from config or a request header value:
//!   `version=v2` or `version=v2, stage=canary`; pairs split on `,` and the first
//!   `=`, trimmed; a bare key (`tag:canary`) means the value "". Empty keys,
//!   duplicate keys, more than [`MAX_PAIRS`] pairs or more than [`MAX_SELECTOR_BYTES`]
//!   bytes are errors — a header that does not parse should be treated as absent.
//! - **Fallback** when the request has no selector or its subset is empty, as Envoy's
//!   `fallback_policy`: `NoFallback` (no instance: the request fails), `AnyEndpoint`
//!   (every instance), `DefaultSubset(pairs)` (the instances matching `pairs`; empty
//!   pairs match every instance; a default subset with no instance means none).
//!
//! Left out: Envoy's `list_as_any`, `fallback_keys_subset`, per-selector fallback
//! policies, `single_host_per_subset`, `panic_mode_any`, locality weight scaling.

use std::borrow::Cow;
use std::collections::HashMap;

/// Limits on selector text (it may come from a client header).
pub const MAX_SELECTOR_BYTES: usize = 1024;
pub const MAX_PAIRS: usize = 16;

pub type Pairs = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Envoy's default: no subset, no instance.
    #[default]
    NoFallback,
    AnyEndpoint,
    DefaultSubset(Pairs),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectorError {
    TooLong(usize),
    TooManyPairs,
    EmptyKey,
    DuplicateKey(String),
}

impl std::fmt::Display for SelectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectorError::TooLong(n) => {
                write!(f, "selector is {n} bytes, more than {MAX_SELECTOR_BYTES}")
            }
            SelectorError::TooManyPairs => write!(f, "selector has more than {MAX_PAIRS} pairs"),
            SelectorError::EmptyKey => write!(f, "selector has an empty key"),
            SelectorError::DuplicateKey(k) => {
                write!(
                    f,
                    "selector names key `{}` twice",
                    crate::instance::truncate(k, 64)
                )
            }
        }
    }
}

/// Parses `k=v, k2=v2` into pairs sorted by key. An empty text is an empty selector.
pub fn parse_selector(text: &str) -> Result<Pairs, SelectorError> {
    if text.len() > MAX_SELECTOR_BYTES {
        return Err(SelectorError::TooLong(text.len()));
    }
    let mut pairs: Pairs = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if pairs.len() == MAX_PAIRS {
            return Err(SelectorError::TooManyPairs);
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(SelectorError::EmptyKey);
        }
        if pairs.iter().any(|(pk, _)| pk == k) {
            return Err(SelectorError::DuplicateKey(k.to_string()));
        }
        pairs.push((k.to_string(), v.to_string()));
    }
    pairs.sort();
    Ok(pairs)
}

/// True when `metadata` has every pair of `selector` (an empty selector matches all).
pub fn matches(metadata: &[(String, String)], selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| metadata.iter().any(|(mk, mv)| mk == k && mv == v))
}

/// Which instances a request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected<'a> {
    /// The selector's subset (non-empty).
    Subset(Cow<'a, [usize]>),
    /// The fallback policy's instances (non-empty).
    Fallback(&'a [usize]),
    /// No instance: fail the request (`NoFallback`, or an empty fallback).
    NoEndpoint,
}

impl Selected<'_> {
    pub fn endpoints(&self) -> &[usize] {
        match self {
            Selected::Subset(s) => s,
            Selected::Fallback(s) => s,
            Selected::NoEndpoint => &[],
        }
    }
}

/// Subsets of one snapshot's instances, built once per table.
#[derive(Debug, Clone, Default)]
pub struct SubsetIndex {
    /// Instance metadata, kept only when no key sets are configured (scan mode).
    metadata: Vec<Pairs>,
    scan: bool,
    /// Sorted selector pairs → instance indexes (ascending).
    subsets: HashMap<Pairs, Vec<usize>>,
    fallback: Vec<usize>,
}

impl SubsetIndex {
    /// `metadata[i]` is instance i's pairs; `key_sets` the configured selectors' keys
    /// (empty: any selector, by scan).
    pub fn build<'a>(
        metadata: impl IntoIterator<Item = &'a [(String, String)]>,
        key_sets: &[Vec<String>],
        fallback: &Fallback,
    ) -> SubsetIndex {
        let metadata: Vec<&[(String, String)]> = metadata.into_iter().collect();
        let mut subsets: HashMap<Pairs, Vec<usize>> = HashMap::new();
        for keys in key_sets {
            let mut keys: Vec<&String> = keys.iter().collect();
            keys.sort();
            keys.dedup();
            for (i, md) in metadata.iter().enumerate() {
                let values: Option<Pairs> = keys
                    .iter()
                    .map(|k| {
                        md.iter()
                            .find(|(mk, _)| mk == *k)
                            .map(|(_, v)| ((*k).clone(), v.clone()))
                    })
                    .collect();
                if let Some(pairs) = values {
                    subsets.entry(pairs).or_default().push(i);
                }
            }
        }
        let fallback = match fallback {
            Fallback::NoFallback => Vec::new(),
            Fallback::AnyEndpoint => (0..metadata.len()).collect(),
            Fallback::DefaultSubset(pairs) => (0..metadata.len())
                .filter(|&i| metadata.get(i).is_some_and(|m| matches(m, pairs)))
                .collect(),
        };
        let scan = key_sets.is_empty();
        SubsetIndex {
            metadata: if scan {
                metadata.iter().map(|m| m.to_vec()).collect()
            } else {
                Vec::new()
            },
            scan,
            subsets,
            fallback,
        }
    }

    /// The instances for a request with `selector` (pairs in any order), or the
    /// fallback when it has none or its subset is empty.
    pub fn select(&self, selector: Option<&[(String, String)]>) -> Selected<'_> {
        if let Some(sel) = selector.filter(|s| !s.is_empty()) {
            if self.scan {
                let hit: Vec<usize> = (0..self.metadata.len())
                    .filter(|&i| self.metadata.get(i).is_some_and(|m| matches(m, sel)))
                    .collect();
                if !hit.is_empty() {
                    return Selected::Subset(Cow::Owned(hit));
                }
            } else {
                let mut key: Pairs = sel.to_vec();
                key.sort();
                key.dedup();
                if let Some(hit) = self.subsets.get(&key).filter(|h| !h.is_empty()) {
                    return Selected::Subset(Cow::Borrowed(hit));
                }
            }
        }
        if self.fallback.is_empty() {
            Selected::NoEndpoint
        } else {
            Selected::Fallback(&self.fallback)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn p(pairs: &[(&str, &str)]) -> Pairs {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fleet() -> Vec<Pairs> {
        vec![
            p(&[("stage", "prod"), ("tag:blue", ""), ("version", "v1")]),
            p(&[("stage", "prod"), ("version", "v2")]),
            p(&[("stage", "canary"), ("version", "v2")]),
            p(&[("version", "v1")]),
            p(&[]),
        ]
    }

    fn index(key_sets: &[&[&str]], fallback: Fallback) -> SubsetIndex {
        let f = fleet();
        let ks: Vec<Vec<String>> = key_sets
            .iter()
            .map(|k| k.iter().map(|s| s.to_string()).collect())
            .collect();
        SubsetIndex::build(f.iter().map(|m| m.as_slice()), &ks, &fallback)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_selectors() {
        assert_eq!(
            parse_selector("version=v2").unwrap(),
            p(&[("version", "v2")])
        );
        assert_eq!(
            parse_selector(" version = v2 , stage=prod,").unwrap(),
            p(&[("stage", "prod"), ("version", "v2")])
        );
        assert_eq!(parse_selector("tag:blue").unwrap(), p(&[("tag:blue", "")]));
        assert_eq!(parse_selector("k=a=b").unwrap(), p(&[("k", "a=b")]));
        assert_eq!(parse_selector("").unwrap(), p(&[]));
        assert_eq!(parse_selector("=v"), Err(SelectorError::EmptyKey));
        assert_eq!(
            parse_selector("a=1,a=2"),
            Err(SelectorError::DuplicateKey("a".into()))
        );
        let many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            parse_selector(&many.join(",")),
            Err(SelectorError::TooManyPairs)
        );
        assert!(matches!(
            parse_selector(&"x".repeat(2000)),
            Err(SelectorError::TooLong(2000))
        ));
        assert_eq!(
            SelectorError::EmptyKey.to_string(),
            "selector has an empty key"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn matching_needs_every_pair() {
        let f = fleet();
        assert!(matches(&f[0], &p(&[("version", "v1"), ("stage", "prod")])));
        assert!(!matches(&f[3], &p(&[("version", "v1"), ("stage", "prod")])));
        assert!(matches(&f[0], &p(&[("tag:blue", "")])));
        assert!(matches(&f[4], &[]));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn precomputed_subsets() {
        let ix = index(&[&["version"], &["stage", "version"]], Fallback::NoFallback);
        let sel = |s: &str| {
            ix.select(Some(&parse_selector(s).unwrap()))
                .endpoints()
                .to_vec()
        };
        assert_eq!(sel("version=v2"), vec![1, 2]);
        assert_eq!(sel("version=v1"), vec![0, 3]);
        assert_eq!(sel("version=v2,stage=prod"), vec![1]);
        // Pair order does not matter.
        let rev = p(&[("version", "v2"), ("stage", "canary")]);
        assert_eq!(ix.select(Some(&rev)).endpoints(), &[2]);
        // A key set that is not configured matches nothing (stage alone).
        assert_eq!(
            ix.select(Some(&p(&[("stage", "prod")]))),
            Selected::NoEndpoint
        );
        // Unknown value: no subset, and no fallback.
        assert_eq!(
            ix.select(Some(&p(&[("version", "v9")]))),
            Selected::NoEndpoint
        );
        assert!(matches!(
            ix.select(Some(&p(&[("version", "v2")]))),
            Selected::Subset(Cow::Borrowed(_))
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn fallback_policies() {
        let none = p(&[("version", "v9")]);
        let any = index(&[&["version"]], Fallback::AnyEndpoint);
        assert_eq!(
            any.select(Some(&none)),
            Selected::Fallback(&[0, 1, 2, 3, 4])
        );
        assert_eq!(any.select(None), Selected::Fallback(&[0, 1, 2, 3, 4]));
        let def = index(
            &[&["version"]],
            Fallback::DefaultSubset(p(&[("version", "v1")])),
        );
        assert_eq!(def.select(Some(&none)), Selected::Fallback(&[0, 3]));
        assert_eq!(def.select(Some(&[])), Selected::Fallback(&[0, 3]));
        // An empty default subset matches every instance.
        let all = index(&[&["version"]], Fallback::DefaultSubset(Vec::new()));
        assert_eq!(all.select(None).endpoints(), &[0, 1, 2, 3, 4]);
        // A default subset with no instance: none.
        let empty = index(
            &[&["version"]],
            Fallback::DefaultSubset(p(&[("version", "v7")])),
        );
        assert_eq!(empty.select(None), Selected::NoEndpoint);
        assert_eq!(
            index(&[&["version"]], Fallback::NoFallback).select(None),
            Selected::NoEndpoint
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn scan_mode_without_configured_key_sets() {
        let ix = index(&[], Fallback::AnyEndpoint);
        let got = ix.select(Some(&p(&[("stage", "prod")])));
        assert_eq!(got.endpoints(), &[0, 1]);
        assert!(matches!(got, Selected::Subset(Cow::Owned(_))));
        assert_eq!(ix.select(Some(&p(&[("tag:blue", "")]))).endpoints(), &[0]);
        assert_eq!(
            ix.select(Some(&p(&[("stage", "dev")]))).endpoints(),
            &[0, 1, 2, 3, 4]
        );
    }
}
