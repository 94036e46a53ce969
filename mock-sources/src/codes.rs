//! Clinical terminology used by the synthetic records: SNOMED CT, dm+d and LOINC.
//!
//! The broker deduplicates on `(system, code)`, so the same fact must carry the same code at every
//! organisation, and the codes should be real so that anything downstream that displays or maps
//! them behaves as it would with live data. Codes marked "checked" were confirmed against public
//! NHS/HL7 examples while writing this; the rest are recalled from the releases and have accurate
//! displays.

pub const SNOMED: &str = "http://snomed.info/sct";
pub const DMD: &str = "https://dmd.nhs.uk";
pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";

/// A coded concept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concept {
    pub code: &'static str,
    pub display: &'static str,
}

const fn c(code: &'static str, display: &'static str) -> Concept {
    Concept { code, display }
}

/// Who typically holds and treats a condition, which decides which organisations record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specialty {
    General,
    Cardiac,
    Respiratory,
    MentalHealth,
}

/// A long-term condition: SNOMED concept, prevalence by age, and its usual medicine.
#[derive(Debug, Clone, Copy)]
pub struct ConditionDef {
    pub concept: Concept,
    /// Prevalence for `(min_age, probability)` bands; the last band whose `min_age <= age` applies.
    pub prevalence: &'static [(i64, f64)],
    pub medicine: Option<usize>,
    pub specialty: Specialty,
}

// Indices into MEDICINES.
const AMLODIPINE: usize = 0;
const METFORMIN: usize = 1;
const SALBUTAMOL: usize = 2;
const APIXABAN: usize = 3;
const SERTRALINE: usize = 4;
const ATORVASTATIN: usize = 5;
const LEVOTHYROXINE: usize = 6;
const FUROSEMIDE: usize = 7;
const PARACETAMOL: usize = 8;
const OMEPRAZOLE: usize = 9;
/// A short antibiotic course (recorded as completed), for patients without long-term medicines.
pub const AMOXICILLIN: usize = 10;

pub const CONDITIONS: &[ConditionDef] = &[
    ConditionDef {
        concept: c("38341003", "Hypertensive disorder"),
        prevalence: &[(0, 0.0), (30, 0.08), (45, 0.25), (65, 0.5)],
        medicine: Some(AMLODIPINE),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("44054006", "Diabetes mellitus type 2"),
        prevalence: &[(0, 0.0), (25, 0.04), (45, 0.09), (65, 0.16)],
        medicine: Some(METFORMIN),
        specialty: Specialty::General,
    },
    ConditionDef {
        concept: c("195967001", "Asthma"),
        prevalence: &[(0, 0.08)],
        medicine: Some(SALBUTAMOL),
        specialty: Specialty::Respiratory,
    },
    ConditionDef {
        concept: c("13645005", "Chronic obstructive lung disease"),
        prevalence: &[(0, 0.0), (45, 0.04), (65, 0.09)],
        medicine: Some(SALBUTAMOL),
        specialty: Specialty::Respiratory,
    },
    ConditionDef {
        concept: c("49436004", "Atrial fibrillation"),
        prevalence: &[(0, 0.0), (55, 0.05), (75, 0.14)],
        medicine: Some(APIXABAN),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("35489007", "Depressive disorder"),
        prevalence: &[(0, 0.0), (16, 0.1)],
        medicine: Some(SERTRALINE),
        specialty: Specialty::MentalHealth,
    },
    ConditionDef {
        concept: c("197480006", "Anxiety disorder"),
        prevalence: &[(0, 0.02), (16, 0.06)],
        medicine: None,
        specialty: Specialty::MentalHealth,
    },
    ConditionDef {
        concept: c("55822004", "Hyperlipidemia"),
        prevalence: &[(0, 0.0), (40, 0.12), (60, 0.2)],
        medicine: Some(ATORVASTATIN),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("40930008", "Hypothyroidism"),
        prevalence: &[(0, 0.0), (18, 0.03)],
        medicine: Some(LEVOTHYROXINE),
        specialty: Specialty::General,
    },
    ConditionDef {
        concept: c("84114007", "Heart failure"),
        prevalence: &[(0, 0.0), (60, 0.03), (75, 0.08)],
        medicine: Some(FUROSEMIDE),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("709044004", "Chronic kidney disease"),
        prevalence: &[(0, 0.0), (60, 0.07), (75, 0.15)],
        medicine: None,
        specialty: Specialty::General,
    },
    ConditionDef {
        concept: c("396275006", "Osteoarthritis"),
        prevalence: &[(0, 0.0), (45, 0.08), (65, 0.2)],
        medicine: Some(PARACETAMOL),
        specialty: Specialty::General,
    },
    ConditionDef {
        concept: c("52448006", "Dementia"),
        prevalence: &[(0, 0.0), (70, 0.04), (80, 0.12)],
        medicine: None,
        specialty: Specialty::MentalHealth,
    },
    ConditionDef {
        concept: c("235595009", "Gastroesophageal reflux disease"),
        prevalence: &[(0, 0.0), (18, 0.05)],
        medicine: Some(OMEPRAZOLE),
        specialty: Specialty::General,
    },
    ConditionDef {
        concept: c("22298006", "Myocardial infarction"),
        prevalence: &[(0, 0.0), (50, 0.02), (70, 0.05)],
        medicine: Some(ATORVASTATIN),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("230690007", "Cerebrovascular accident"),
        prevalence: &[(0, 0.0), (60, 0.02), (75, 0.05)],
        medicine: Some(ATORVASTATIN),
        specialty: Specialty::Cardiac,
    },
    ConditionDef {
        concept: c("13746004", "Bipolar disorder"),
        prevalence: &[(0, 0.0), (18, 0.01)],
        medicine: None,
        specialty: Specialty::MentalHealth,
    },
    ConditionDef {
        concept: c("58214004", "Schizophrenia"),
        prevalence: &[(0, 0.0), (18, 0.007)],
        medicine: None,
        specialty: Specialty::MentalHealth,
    },
];

/// A dm+d product with the instruction a prescriber would write.
#[derive(Debug, Clone, Copy)]
pub struct MedicineDef {
    pub concept: Concept,
    pub dosage: &'static str,
}

pub const MEDICINES: &[MedicineDef] = &[
    MedicineDef {
        concept: c("319773006", "Amlodipine 5mg tablets"),
        dosage: "One tablet once a day",
    }, // checked
    MedicineDef {
        concept: c("325278007", "Metformin 500mg tablets"),
        dosage: "One tablet twice a day with food",
    }, // checked
    MedicineDef {
        concept: c(
            "39113611000001102",
            "Salbutamol 100micrograms/dose inhaler CFC free",
        ),
        dosage: "Two puffs when required",
    }, // checked
    MedicineDef {
        concept: c("42206511000001102", "Apixaban 5mg tablets"),
        dosage: "One tablet twice a day",
    }, // checked
    MedicineDef {
        concept: c("321949006", "Sertraline 50mg tablets"),
        dosage: "One tablet once a day",
    },
    MedicineDef {
        concept: c("320000009", "Atorvastatin 20mg tablets"),
        dosage: "One tablet at night",
    },
    MedicineDef {
        concept: c("319740004", "Levothyroxine sodium 50microgram tablets"),
        dosage: "One tablet in the morning",
    },
    MedicineDef {
        concept: c("317972000", "Furosemide 40mg tablets"),
        dosage: "One tablet in the morning",
    }, // checked
    MedicineDef {
        concept: c("322236009", "Paracetamol 500mg tablets"),
        dosage: "One or two tablets up to four times a day when required",
    }, // checked
    MedicineDef {
        concept: c("317335000", "Omeprazole 20mg gastro-resistant capsules"),
        dosage: "One capsule once a day",
    },
    MedicineDef {
        concept: c("39732311000001104", "Amoxicillin 250mg capsules"),
        dosage: "One capsule three times a day for 5 days",
    }, // checked
];

/// An allergy: the SNOMED allergy concept, its FHIR category, and a typical reaction.
#[derive(Debug, Clone, Copy)]
pub struct AllergyDef {
    pub concept: Concept,
    pub category: &'static str,
    pub reaction: Concept,
    pub prevalence: f64,
}

pub const ALLERGIES: &[AllergyDef] = &[
    AllergyDef {
        concept: c("91936005", "Allergy to penicillin"),
        category: "medication",
        reaction: c("271807003", "Eruption of skin"),
        prevalence: 0.08,
    },
    AllergyDef {
        concept: c("300916003", "Latex allergy"),
        category: "environment",
        reaction: c("126485001", "Urticaria"),
        prevalence: 0.02,
    },
    AllergyDef {
        concept: c("91935009", "Allergy to peanuts"),
        category: "food",
        reaction: c("39579001", "Anaphylaxis"),
        prevalence: 0.02,
    },
    AllergyDef {
        concept: c("418689008", "Allergy to grass pollen"),
        category: "environment",
        reaction: c("267036007", "Dyspnea"),
        prevalence: 0.04,
    },
    AllergyDef {
        concept: c("91930004", "Allergy to eggs"),
        category: "food",
        reaction: c("422587007", "Nausea"),
        prevalence: 0.01,
    },
    AllergyDef {
        concept: c("293586001", "Allergy to aspirin"),
        category: "medication",
        reaction: c("126485001", "Urticaria"),
        prevalence: 0.01,
    },
];

/// A quantitative test: LOINC code, UCUM unit, and the reference range used for interpretation.
#[derive(Debug, Clone, Copy)]
pub struct TestDef {
    pub concept: Concept,
    pub unit: &'static str,
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// Typical value and spread in a healthy adult.
    pub mean: f64,
    pub sd: f64,
    pub decimals: usize,
    pub vital_sign: bool,
}

#[allow(clippy::too_many_arguments)] // a table-row constructor: positional reads best in the table
const fn lab(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    low: Option<f64>,
    high: Option<f64>,
    mean: f64,
    sd: f64,
    decimals: usize,
) -> TestDef {
    TestDef {
        concept: c(code, display),
        unit,
        low,
        high,
        mean,
        sd,
        decimals,
        vital_sign: false,
    }
}

#[allow(clippy::too_many_arguments)] // as `lab`
const fn vital(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    low: Option<f64>,
    high: Option<f64>,
    mean: f64,
    sd: f64,
    decimals: usize,
) -> TestDef {
    TestDef {
        concept: c(code, display),
        unit,
        low,
        high,
        mean,
        sd,
        decimals,
        vital_sign: true,
    }
}

pub const HBA1C: usize = 0;
pub const GLUCOSE: usize = 1;
pub const CREATININE: usize = 2;
pub const HAEMOGLOBIN: usize = 3;
pub const WBC: usize = 4;
pub const PLATELETS: usize = 5;
pub const SODIUM: usize = 6;
pub const POTASSIUM: usize = 7;
pub const CHOLESTEROL: usize = 8;
pub const TSH: usize = 9;
pub const SYSTOLIC: usize = 10;
pub const DIASTOLIC: usize = 11;
pub const HEART_RATE: usize = 12;
pub const SPO2: usize = 13;
pub const RESP_RATE: usize = 14;
pub const TEMPERATURE: usize = 15;
pub const WEIGHT: usize = 16;

pub const TESTS: &[TestDef] = &[
    lab(
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        Some(4.0),
        Some(5.6),
        5.2,
        0.3,
        1,
    ),
    lab(
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
        Some(70.0),
        Some(99.0),
        88.0,
        9.0,
        0,
    ),
    lab(
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        Some(0.6),
        Some(1.2),
        0.9,
        0.15,
        2,
    ),
    lab(
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        Some(12.0),
        Some(17.5),
        14.2,
        1.3,
        1,
    ),
    lab(
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        Some(4.0),
        Some(11.0),
        7.0,
        1.8,
        1,
    ),
    lab(
        "777-3",
        "Platelets [#/volume] in Blood by Automated count",
        "10*3/uL",
        Some(150.0),
        Some(400.0),
        260.0,
        55.0,
        0,
    ),
    lab(
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        Some(135.0),
        Some(145.0),
        140.0,
        2.2,
        0,
    ),
    lab(
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        Some(3.5),
        Some(5.1),
        4.3,
        0.35,
        1,
    ),
    lab(
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        None,
        Some(200.0),
        185.0,
        30.0,
        0,
    ),
    lab(
        "3016-3",
        "Thyrotropin [Units/volume] in Serum or Plasma",
        "m[IU]/L",
        Some(0.4),
        Some(4.0),
        1.8,
        0.7,
        2,
    ),
    vital(
        "8480-6",
        "Systolic blood pressure",
        "mm[Hg]",
        Some(90.0),
        Some(140.0),
        124.0,
        12.0,
        0,
    ),
    vital(
        "8462-4",
        "Diastolic blood pressure",
        "mm[Hg]",
        Some(60.0),
        Some(90.0),
        78.0,
        8.0,
        0,
    ),
    vital(
        "8867-4",
        "Heart rate",
        "/min",
        Some(60.0),
        Some(100.0),
        76.0,
        10.0,
        0,
    ),
    vital(
        "59408-5",
        "Oxygen saturation in Arterial blood by Pulse oximetry",
        "%",
        Some(94.0),
        Some(100.0),
        97.0,
        1.5,
        0,
    ),
    vital(
        "9279-1",
        "Respiratory rate",
        "/min",
        Some(12.0),
        Some(20.0),
        16.0,
        2.5,
        0,
    ),
    vital(
        "8310-5",
        "Body temperature",
        "Cel",
        Some(36.1),
        Some(37.8),
        36.8,
        0.4,
        1,
    ),
    vital("29463-7", "Body weight", "kg", None, None, 76.0, 14.0, 1),
];

/// A laboratory or imaging report grouping results.
#[derive(Debug, Clone, Copy)]
pub struct PanelDef {
    pub concept: Concept,
    pub tests: &'static [usize],
    /// HL7 v2-0074 diagnostic service section: `LAB`, `HM` (haematology), `CH` (chemistry), `RAD`.
    pub section: (&'static str, &'static str),
}

pub const PANELS: &[PanelDef] = &[
    PanelDef {
        concept: c("58410-2", "CBC panel - Blood by Automated count"),
        tests: &[HAEMOGLOBIN, WBC, PLATELETS],
        section: ("HM", "Hematology"),
    },
    PanelDef {
        concept: c("51990-0", "Basic metabolic panel - Blood"),
        tests: &[SODIUM, POTASSIUM, CREATININE, GLUCOSE],
        section: ("CH", "Chemistry"),
    },
    PanelDef {
        concept: c("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
        tests: &[HBA1C],
        section: ("CH", "Chemistry"),
    },
    PanelDef {
        concept: c("57698-3", "Lipid panel with direct LDL - Serum or Plasma"),
        tests: &[CHOLESTEROL],
        section: ("CH", "Chemistry"),
    },
    PanelDef {
        concept: c("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma"),
        tests: &[TSH],
        section: ("CH", "Chemistry"),
    },
];

pub const CHEST_XRAY: Concept = c("36643-5", "XR Chest 2 Views");

// Document types (SNOMED record artifacts).
pub const DISCHARGE_SUMMARY: Concept = c("373942005", "Discharge summary");
pub const ENCOUNTER_REPORT: Concept = c("371531000", "Report of clinical encounter");
pub const IMAGING_REPORT: Concept = c("4201000179104", "Imaging report");
pub const CARE_PLAN_DOC: Concept = c("734163000", "Care plan");
pub const ADVANCE_CARE_PLAN: Concept = c("736366004", "Advance care plan");

// Encounter types.
pub const AMBULANCE_CARE: Concept = c("11424001", "Ambulance-based care");
pub const CONSULTATION: Concept = c("11429006", "Consultation");
pub const EMERGENCY_ADMISSION: Concept = c("183452005", "Emergency hospital admission");
pub const ED_VISIT: Concept = c("4525004", "Emergency department patient visit");
pub const PROBLEM_ENCOUNTER: Concept = c("185347001", "Encounter for problem");
pub const TELEPHONE_ENCOUNTER: Concept = c("185317003", "Telephone encounter");

/// Reasons for an ambulance call.
pub const AMBULANCE_REASONS: &[Concept] = &[
    c("29857009", "Chest pain"),
    c("217082002", "Accidental fall"),
    c("267036007", "Dyspnea"),
    c("271594007", "Syncope"),
    c("21522001", "Abdominal pain"),
];

// ---- clinical-safety variety ------------------------------------------------------------------

/// Read v2, still carried beside SNOMED CT by GP systems for legacy entries.
pub const READ_V2: &str = "http://read.info/readv2";
/// ICD-10, which hospitals code diagnoses in for activity reporting.
pub const ICD10: &str = "http://hl7.org/fhir/sid/icd-10";

/// A second coding for a condition, by its SNOMED code: `(Read v2, ICD-10)`.
pub fn condition_alternatives(snomed: &str) -> (Option<Concept>, Option<Concept>) {
    let read = match snomed {
        "38341003" => Some(c("G20..", "Essential hypertension")),
        "44054006" => Some(c("C10F.", "Type 2 diabetes mellitus")),
        "195967001" => Some(c("H33..", "Asthma")),
        "13645005" => Some(c("H3...", "Chronic obstructive pulmonary disease")),
        "49436004" => Some(c("G573.", "Atrial fibrillation and flutter")),
        "35489007" => Some(c("E2B..", "Depressive disorder NEC")),
        "40930008" => Some(c("C04..", "Acquired hypothyroidism")),
        "84114007" => Some(c("G58..", "Heart failure")),
        "709044004" => Some(c("1Z1..", "Chronic renal impairment")),
        _ => None,
    };
    let icd = match snomed {
        "38341003" => Some(c("I10", "Essential (primary) hypertension")),
        "44054006" => Some(c("E11.9", "Type 2 diabetes mellitus without complications")),
        "195967001" => Some(c("J45.9", "Asthma, unspecified")),
        "13645005" => Some(c(
            "J44.9",
            "Chronic obstructive pulmonary disease, unspecified",
        )),
        "49436004" => Some(c(
            "I48.9",
            "Atrial fibrillation and atrial flutter, unspecified",
        )),
        "35489007" => Some(c("F32.9", "Depressive episode, unspecified")),
        "197480006" => Some(c("F41.9", "Anxiety disorder, unspecified")),
        "55822004" => Some(c("E78.5", "Hyperlipidaemia, unspecified")),
        "40930008" => Some(c("E03.9", "Hypothyroidism, unspecified")),
        "84114007" => Some(c("I50.9", "Heart failure, unspecified")),
        "709044004" => Some(c("N18.9", "Chronic kidney disease, unspecified")),
        "396275006" => Some(c("M19.9", "Arthrosis, unspecified")),
        "52448006" => Some(c("F03", "Unspecified dementia")),
        "235595009" => Some(c(
            "K21.9",
            "Gastro-oesophageal reflux disease without oesophagitis",
        )),
        "22298006" => Some(c("I21.9", "Acute myocardial infarction, unspecified")),
        "230690007" => Some(c(
            "I64",
            "Stroke, not specified as haemorrhage or infarction",
        )),
        "13746004" => Some(c("F31.9", "Bipolar affective disorder, unspecified")),
        "58214004" => Some(c("F20.9", "Schizophrenia, unspecified")),
        _ => None,
    };
    (read, icd)
}

/// "No known allergy": an assertion recorded as an AllergyIntolerance, not an allergy.
pub const NO_KNOWN_ALLERGY: Concept = c("716186003", "No known allergy");
/// A past sexually transmitted infection: in the RCGP sensitive set (and the broker's).
pub const CHLAMYDIA: Concept = c("105629000", "Chlamydial infection");
/// Its ICD-10 coding, carried second.
pub const CHLAMYDIA_ICD10: Concept =
    c("A56.0", "Chlamydial infection of lower genitourinary tract");
/// What a hospital that disagrees on the dose writes instead: twice the GP's dose.
pub fn other_dosage(med: usize) -> String {
    let dosage = MEDICINES[med].dosage;
    for (from, to) in [
        ("One tablet", "Two tablets"),
        ("One capsule", "Two capsules"),
        ("Two puffs", "Four puffs"),
        ("One or two tablets", "Two tablets"),
    ] {
        if let Some(rest) = dosage.strip_prefix(from) {
            return format!("{to}{rest} (dose increased in hospital)");
        }
    }
    format!("{dosage}, doubled (dose increased in hospital)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_medicines_and_panel_tests_point_at_real_entries() {
        for def in CONDITIONS {
            if let Some(m) = def.medicine {
                assert!(m < MEDICINES.len());
            }
        }
        for p in PANELS {
            for t in p.tests {
                assert!(*t < TESTS.len());
            }
        }
        assert!(
            CONDITIONS.len() <= 32,
            "conditions are held in a u32 bit set"
        );
    }
}
