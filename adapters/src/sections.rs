//! A set of record sections, as a small bitmask: cheap to copy, hash and put in a cache key.

use carerecord_proto::Section;

/// A set of [`Section`]s. The empty request means "all sections", so [`SectionSet::from_request`]
/// never yields an empty set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectionSet(u16);

/// A section number in a request that is not a known section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown section {0}: expected one of 1..=8 (conditions .. appointments)")]
pub struct UnknownSection(pub i32);

impl SectionSet {
    /// Every section.
    pub const ALL: SectionSet = SectionSet(0b1_1111_1110);
    /// No section.
    pub const NONE: SectionSet = SectionSet(0);

    /// The set a request asks for: its listed sections, or all when it lists none.
    pub fn from_request(sections: &[i32]) -> Result<Self, UnknownSection> {
        if sections.is_empty() {
            return Ok(Self::ALL);
        }
        let mut set = Self::NONE;
        for raw in sections {
            match Section::try_from(*raw) {
                Ok(Section::Unspecified) | Err(_) => return Err(UnknownSection(*raw)),
                Ok(section) => set = set.with(section),
            }
        }
        Ok(set)
    }

    /// This set plus one section.
    pub const fn with(self, section: Section) -> Self {
        SectionSet(self.0 | (1 << section as u16))
    }

    /// Whether the set holds `section`.
    pub const fn contains(self, section: Section) -> bool {
        !matches!(section, Section::Unspecified) && self.0 & (1 << section as u16) != 0
    }

    /// Whether every section of `other` is in `self`.
    pub const fn is_superset_of(self, other: SectionSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// The sections, in record order.
    pub fn iter(self) -> impl Iterator<Item = Section> {
        Section::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// The raw bits, for cache keys and wire forms.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// The sections as proto enum numbers, for forwarding in a request.
    pub fn to_request(self) -> Vec<i32> {
        if self == Self::ALL {
            return Vec::new();
        }
        self.iter().map(|s| s as i32).collect()
    }
}

impl std::fmt::Debug for SectionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(self.iter().map(|s| s.short_name()))
            .finish()
    }
}

impl FromIterator<Section> for SectionSet {
    fn from_iter<T: IntoIterator<Item = Section>>(iter: T) -> Self {
        iter.into_iter().fold(Self::NONE, SectionSet::with)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_request_means_all_sections() {
        let set = SectionSet::from_request(&[]).expect("valid");
        assert_eq!(set, SectionSet::ALL);
        assert_eq!(set.iter().count(), 8);
    }

    #[test]
    fn listed_sections_only() {
        let set =
            SectionSet::from_request(&[Section::Allergies as i32, Section::Medications as i32])
                .expect("valid");
        assert!(set.contains(Section::Allergies));
        assert!(set.contains(Section::Medications));
        assert!(!set.contains(Section::Conditions));
        assert_eq!(set.to_request(), vec![2, 3]);
    }

    #[test]
    fn unknown_or_unspecified_sections_are_rejected() {
        assert_eq!(SectionSet::from_request(&[0]), Err(UnknownSection(0)));
        assert_eq!(SectionSet::from_request(&[99]), Err(UnknownSection(99)));
        assert_eq!(SectionSet::from_request(&[-1]), Err(UnknownSection(-1)));
    }
}
