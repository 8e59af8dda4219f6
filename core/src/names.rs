//! Name normalisation for search and duplicate detection.
//!
//! Names are written in French transliteration by different people: "Traoré", "TRAORE",
//! "Traore". Normalising removes accents, folds case and collapses spaces.

use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};

/// Lower-case, accent-free, single-spaced form of a name.
pub fn normalise(name: &str) -> String {
    let folded: String = name
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn folds_accents_case_and_spacing() {
        assert_eq!(normalise("  Aminata   TRAORÉ "), "aminata traore");
        assert_eq!(normalise("Traoré"), normalise("traore"));
        assert_eq!(normalise("Ag-Alhassane"), "ag alhassane");
    }
}
