//! Word lists for synthetic people, places and organisations.
//!
//! Plain English names and made-up places: realistic enough that a screen of results reads like
//! a real region, never a real person. Organisation names are invented; organisation codes are
//! ODS-shaped so that code paths which format or validate them are exercised.

pub const FAMILY_NAMES: &[&str] = &[
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Johnson",
    "Davies",
    "Robinson",
    "Wright",
    "Thompson",
    "Evans",
    "Walker",
    "White",
    "Roberts",
    "Green",
    "Hall",
    "Wood",
    "Jackson",
    "Clarke",
    "Patel",
    "Khan",
    "Lewis",
    "James",
    "Phillips",
    "Mason",
    "Mitchell",
    "Rose",
    "Davis",
    "Rodriguez",
    "Cox",
    "Alexander",
    "Morgan",
    "Moore",
    "Martin",
    "Price",
    "Hughes",
    "Edwards",
    "Harris",
    "Turner",
    "Cooper",
    "Hill",
    "Ward",
    "Morris",
    "King",
    "Baker",
    "Harrison",
    "Morrison",
    "Begum",
    "Ahmed",
    "Singh",
    "Ali",
    "Okafor",
    "Adeyemi",
    "Nowak",
    "Kowalski",
    "O'Brien",
    "Murphy",
    "Kelly",
    "Macdonald",
    "Campbell",
    "Stewart",
    "Reid",
    "Matthews",
    "Stephens",
    "Lloyd",
    "Chapman",
    "Fletcher",
    "Holmes",
    "Carter",
    "Shaw",
    "Richardson",
    "Bennett",
];

pub const FEMALE_GIVEN: &[&str] = &[
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Mia",
    "Grace",
    "Sophie",
    "Emily",
    "Jane",
    "Margaret",
    "Susan",
    "Patricia",
    "Elizabeth",
    "Sarah",
    "Helen",
    "Joan",
    "Dorothy",
    "Fatima",
    "Aisha",
    "Priya",
    "Chloe",
    "Hannah",
    "Lucy",
    "Ellie",
    "Zara",
    "Ruth",
    "Irene",
    "Maureen",
    "Kathleen",
    "Agnieszka",
    "Niamh",
    "Siobhan",
    "Ngozi",
    "Amara",
    "Rebecca",
    "Claire",
    "Linda",
    "Barbara",
];

pub const MALE_GIVEN: &[&str] = &[
    "Oliver", "George", "Noah", "Arthur", "Leo", "Harry", "Jack", "James", "John", "David",
    "Michael", "Peter", "Robert", "William", "Thomas", "Richard", "Mohammed", "Yusuf", "Arjun",
    "Ravi", "Daniel", "Samuel", "Joseph", "Kenneth", "Brian", "Derek", "Colin", "Tomasz", "Piotr",
    "Sean", "Patrick", "Chinedu", "Kwame", "Matthew", "Andrew", "Paul", "Stephen",
];

pub const STREETS: &[&str] = &[
    "High Street",
    "Station Road",
    "Church Lane",
    "Victoria Road",
    "Mill Lane",
    "Park Avenue",
    "Queens Road",
    "Kings Road",
    "The Crescent",
    "Orchard Close",
    "Manor Way",
    "Chapel Street",
    "Meadow View",
    "Willow Drive",
    "Riverside Walk",
    "Albert Terrace",
    "New Road",
    "Green Lane",
    "School Lane",
    "Elm Grove",
    "Castle Street",
    "Springfield Road",
    "Beech Avenue",
    "North Street",
];

/// Towns of the synthetic region, with the postcode area their postcodes use.
pub const TOWNS: &[(&str, &str)] = &[
    ("Riverside", "RV"),
    ("Northbrook", "NB"),
    ("Ashford Vale", "AV"),
    ("Kingsmead", "KM"),
    ("Easterly", "EY"),
    ("Hollowfield", "HF"),
    ("Westmoor", "WM"),
    ("Southbay", "SB"),
];

pub const REGION_NAMES: &[&str] = &["Wessex Vale", "Northmoor", "Three Rivers", "Eastmarch"];

pub const GP_PATTERNS: &[&str] = &[
    "{} Medical Practice",
    "{} Health Centre",
    "The {} Surgery",
    "{} Family Practice",
    "{} Medical Centre",
];

pub const CARE_HOME_NAMES: &[&str] = &[
    "Willow House",
    "Oakleigh Lodge",
    "Rosewood Court",
    "Beechcroft",
    "Meadowbank",
    "Cedar Grange",
    "Hawthorn Manor",
    "Lavender Hill",
    "Elmstead House",
    "Birchfield",
];

/// A plausible alternative spelling of a family name, as a different organisation might hold it.
pub fn misspelling(family: &str) -> String {
    const PAIRS: &[(&str, &str)] = &[
        ("Smith", "Smyth"),
        ("Thompson", "Thomson"),
        ("Phillips", "Philips"),
        ("Clarke", "Clark"),
        ("Reid", "Reed"),
        ("Macdonald", "McDonald"),
        ("Matthews", "Mathews"),
        ("Stephens", "Stevens"),
        ("Khan", "Kahn"),
        ("O'Brien", "OBrien"),
        ("Begum", "Begam"),
        ("Davies", "Davis"),
        ("Davis", "Davies"),
        ("Ahmed", "Ahmad"),
    ];
    if let Some((_, alt)) = PAIRS.iter().find(|(name, _)| *name == family) {
        return (*alt).to_string();
    }
    // Otherwise drop one of a doubled letter, or double the last consonant.
    let chars: Vec<char> = family.chars().collect();
    if let Some(i) = chars.windows(2).position(|w| w[0] == w[1]) {
        let mut out = chars.clone();
        out.remove(i);
        return out.into_iter().collect();
    }
    let mut out = family.to_string();
    if let Some(last) = chars.last() {
        out.push(*last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspellings_differ_from_the_original() {
        for name in FAMILY_NAMES {
            assert_ne!(misspelling(name), *name, "{name}");
        }
    }
}
