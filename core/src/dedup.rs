//! Possible duplicate registrations: the same family registered on two tablets.
//!
//! # The measure
//!
//! 1. **Names** are normalised ([`crate::names::normalise`]: accents, case, spacing), then
//!    reduced to a *transliteration key* per word ([`translit_key`]): French and English
//!    spellings of the same Bambara, Songhai, Fulfulde or Tamasheq sound map to one form
//!    (`ou`/`w`/`u`, `dj`/`j`, `c`/`k`/`q`, `y`/`i`, `ph`/`f`, doubled letters), so
//!    "Kouyaté", "Kuyate" and "Kouyatte" agree. Two names are compared with the
//!    Jaro-Winkler similarity of their keys, word by word after sorting the words (so
//!    "Traoré Aminata" matches "Aminata Traoré"), averaged over the longer name.
//! 2. **The household** adds evidence: same size, same composition (members by sex and
//!    5-year age band, allowing one difference), same origin, same site.
//! 3. **Score** = 0.6 × name + 0.15 × size + 0.1 × composition + 0.1 × origin + 0.05 × site.
//!    A pair is a candidate at [`THRESHOLD`] or above. A manager decides; nothing is merged
//!    automatically.
//!
//! # Blocking
//!
//! Comparing every pair of 100,000 households is 5 × 10⁹ comparisons. Households are
//! instead grouped into blocks, and only pairs within a block are scored: the
//! transliteration key of the whole name (spelling variants), and each word's key with the
//! household's size and site (a typo in the other word). Blocks larger than [`MAX_BLOCK`]
//! (a very common name: Malian names are few and repeated) are split by household size. A
//! pair that differs in both words, or whose size changed as well as one word, is missed:
//! the price of seconds instead of hours. BENCHMARKS.md has the time for 100,000.

use std::collections::HashMap;

use serde::Serialize;

use crate::household::{Household, Sex, Status};
use crate::names::normalise;
use crate::DocumentId;

/// Score at or above which a pair is shown as a possible duplicate.
pub const THRESHOLD: f64 = 0.85;
/// Largest block compared pair by pair before splitting it by household size.
pub const MAX_BLOCK: usize = 64;

/// A pair of households that may be the same family.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// One household (the earlier registration).
    pub a: DocumentId,
    /// The other.
    pub b: DocumentId,
    /// The score, 0 to 1.
    pub score: f64,
    /// What agreed, e.g. `name 0.97`, `size`, `composition`, `origin`, `site`.
    pub reasons: Vec<String>,
}

/// The transliteration key of one normalised word.
pub fn translit_key(word: &str) -> String {
    let w = word
        .replace("dj", "j")
        .replace("ou", "u")
        .replace("ph", "f")
        .replace("gu", "g")
        .replace("qu", "k")
        .replace("sh", "s")
        .replace("ch", "s")
        .replace("ny", "n")
        .replace("gn", "n");
    let mut out = String::with_capacity(w.len());
    for c in w.chars() {
        let c = match c {
            'w' => 'u',
            'y' => 'i',
            'c' | 'q' => 'k',
            'z' => 's',
            'h' => continue,
            other => other,
        };
        if out.ends_with(c) {
            continue;
        }
        out.push(c);
    }
    out
}

fn name_keys(name: &str) -> Vec<String> {
    let mut keys: Vec<String> = normalise(name)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(translit_key)
        .collect();
    keys.sort();
    keys
}

/// Jaro-Winkler similarity of two strings, 0 to 1.
pub fn jaro_winkler(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let window = (a.len().max(b.len()) / 2).saturating_sub(1);
    let mut a_match = vec![false; a.len()];
    let mut b_match = vec![false; b.len()];
    let mut matches = 0usize;
    for (i, ca) in a.iter().enumerate() {
        let lo = i.saturating_sub(window);
        let hi = (i + window + 1).min(b.len());
        for j in lo..hi {
            if !b_match[j] && b[j] == *ca {
                a_match[i] = true;
                b_match[j] = true;
                matches += 1;
                break;
            }
        }
    }
    if matches == 0 {
        return 0.0;
    }
    let mut transpositions = 0usize;
    let mut k = 0usize;
    for (i, ca) in a.iter().enumerate() {
        if !a_match[i] {
            continue;
        }
        while !b_match[k] {
            k += 1;
        }
        if *ca != b[k] {
            transpositions += 1;
        }
        k += 1;
    }
    let m = matches as f64;
    let jaro =
        (m / a.len() as f64 + m / b.len() as f64 + (m - transpositions as f64 / 2.0) / m) / 3.0;
    let prefix = a.iter().zip(&b).take(4).take_while(|(x, y)| x == y).count() as f64;
    jaro + prefix * 0.1 * (1.0 - jaro)
}

/// Similarity of two heads' names, 0 to 1, through their transliteration keys.
pub fn name_similarity(a: &str, b: &str) -> f64 {
    similarity_of_keys(&name_keys(a), &name_keys(b))
}

fn similarity_of_keys(a: &[String], b: &[String]) -> f64 {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if long.is_empty() {
        return 0.0;
    }
    // Each word of the shorter name takes its best match in the longer one.
    let total: f64 = short
        .iter()
        .map(|w| long.iter().map(|v| jaro_winkler(w, v)).fold(0.0, f64::max))
        .sum();
    total / long.len() as f64
}

struct Prepared<'a> {
    id: DocumentId,
    h: &'a Household,
    keys: Vec<String>,
    composition: Vec<(Sex, u32)>,
    origin: Option<String>,
}

fn composition(h: &Household) -> Vec<(Sex, u32)> {
    let mut c: Vec<(Sex, u32)> = h.members.iter().map(|m| (m.sex, m.age / 5)).collect();
    c.sort_by_key(|(s, a)| (*s == Sex::Male, *a));
    c
}

/// Members that differ between two compositions (multiset difference, both ways).
fn composition_distance(a: &[(Sex, u32)], b: &[(Sex, u32)]) -> usize {
    let mut rest: Vec<(Sex, u32)> = b.to_vec();
    let mut missing = 0;
    for m in a {
        match rest.iter().position(|x| x == m) {
            Some(i) => {
                rest.swap_remove(i);
            }
            None => missing += 1,
        }
    }
    missing + rest.len()
}

fn score(x: &Prepared<'_>, y: &Prepared<'_>) -> Option<Candidate> {
    let name = if x.keys == y.keys {
        1.0
    } else {
        similarity_of_keys(&x.keys, &y.keys)
    };
    // Below this the rest cannot lift the pair over the threshold.
    if name < 0.75 {
        return None;
    }
    let mut s = 0.6 * name;
    let mut reasons = vec![format!("name {name:.2}")];
    if x.h.size == y.h.size {
        s += 0.15;
        reasons.push("size".into());
    }
    if composition_distance(&x.composition, &y.composition) <= 1 && !x.composition.is_empty() {
        s += 0.1;
        reasons.push("composition".into());
    }
    if x.origin.is_some() && x.origin == y.origin {
        s += 0.1;
        reasons.push("origin".into());
    }
    if x.h.site == y.h.site {
        s += 0.05;
        reasons.push("site".into());
    }
    if s < THRESHOLD {
        return None;
    }
    let (a, b) = if (x.h.registered.at, x.id) <= (y.h.registered.at, y.id) {
        (x.id, y.id)
    } else {
        (y.id, x.id)
    };
    Some(Candidate {
        a,
        b,
        score: (s * 1000.0).round() / 1000.0,
        reasons,
    })
}

/// Possible duplicates among `households`, best first. Households already marked as a
/// duplicate, or erased, are left out.
pub fn candidates(households: &[(DocumentId, Household)]) -> Vec<Candidate> {
    let prepared: Vec<Prepared<'_>> = households
        .iter()
        .filter(|(_, h)| matches!(h.status, Status::Active | Status::Returned))
        .map(|(id, h)| Prepared {
            id: *id,
            h,
            keys: name_keys(&h.head_name),
            composition: composition(h),
            origin: h.origin.as_deref().map(normalise).filter(|o| !o.is_empty()),
        })
        .collect();
    // Two blocking passes; a pair that shares any block is scored.
    // 1. The whole name's transliteration key: spelling variants of one name.
    // 2. One word of the name, with household size and site: a typo in the other word.
    let mut blocks: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, p) in prepared.iter().enumerate() {
        blocks.entry(p.keys.join(" ")).or_default().push(i);
        for k in &p.keys {
            if k.len() >= 2 {
                blocks
                    .entry(format!("{k}|{}|{}", p.h.size, p.h.site))
                    .or_default()
                    .push(i);
            }
        }
    }
    let mut out = Vec::new();
    let compare = |members: &[usize], out: &mut Vec<Candidate>| {
        for (n, &i) in members.iter().enumerate() {
            for &j in &members[n + 1..] {
                if let Some(c) = score(&prepared[i], &prepared[j]) {
                    out.push(c);
                }
            }
        }
    };
    for members in blocks.values() {
        if members.len() < 2 {
            continue;
        }
        if members.len() <= MAX_BLOCK {
            compare(members, &mut out);
        } else {
            // A very common name: only households of the same size are compared (a
            // different size cannot reach the threshold with an identical name unless the
            // composition and origin both match, which a size change rules out).
            let mut by_place: HashMap<u32, Vec<usize>> = HashMap::new();
            for &i in members {
                by_place.entry(prepared[i].h.size).or_default().push(i);
            }
            for sub in by_place.values() {
                compare(sub, &mut out);
            }
        }
    }
    // A pair found in two blocks is listed once.
    out.sort_by_key(|x| (x.a, x.b));
    out.dedup_by(|x, y| x.a == y.a && x.b == y.b);
    out.sort_by(|x, y| {
        y.score
            .total_cmp(&x.score)
            .then((x.a, x.b).cmp(&(y.a, y.b)))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transliterations_agree() {
        assert_eq!(translit_key("kouyate"), translit_key("kuyate"));
        assert_eq!(translit_key("kouyatte"), translit_key("kuyate"));
        assert_eq!(translit_key("djenepo"), translit_key("jenepo"));
        assert_eq!(translit_key("coulibaly"), translit_key("kulibali"));
        assert!(name_similarity("Aminata Traoré", "TRAORE Aminata") > 0.99);
        assert!(name_similarity("Fatoumata Kouyaté", "Fatumata Kuyate") > 0.95);
        assert!(name_similarity("Aminata Traoré", "Moussa Diarra") < 0.6);
    }

    #[test]
    fn jaro_winkler_reference_values() {
        // Classic examples from Winkler's paper.
        assert!((jaro_winkler("martha", "marhta") - 0.961).abs() < 0.001);
        assert!((jaro_winkler("dixon", "dicksonx") - 0.813).abs() < 0.001);
        assert_eq!(jaro_winkler("", ""), 1.0);
        assert_eq!(jaro_winkler("abc", ""), 0.0);
    }
}
