//! Lenient, single-pass JSON reading for FHIR resources.
//!
//! One malformed resource must cost a warning, not the whole page. serde's derived structs stop at
//! the first wrong-typed field and leave the parser mid-object, so isolating errors that way needs
//! a second pass (parse to `serde_json::Value`, then convert each resource), which roughly doubles
//! the cost on the broker's hot path. Instead every field is a [`Field`]: a value of the wrong JSON
//! shape is skipped in place and remembered as [`Field::Invalid`]. Parsing then fails only on JSON
//! syntax errors, and the mapper decides per resource whether an invalid field it needs makes the
//! resource unreadable.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A field read leniently: absent (or `null`), of the expected shape, or present with the wrong
/// shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Field<T> {
    #[default]
    Absent,
    Valid(T),
    Invalid,
}

/// A list whose elements are each read leniently.
pub(crate) type List<T> = Field<Vec<Field<T>>>;

/// A resource (or part of one) had a field of the wrong shape where the mapper needed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

impl<T> Field<T> {
    /// The value if present; `Err` if it had the wrong shape.
    pub(crate) fn get(&self) -> Result<Option<&T>, Malformed> {
        match self {
            Field::Absent => Ok(None),
            Field::Valid(v) => Ok(Some(v)),
            Field::Invalid => Err(Malformed),
        }
    }

    /// Moves the value out (leaving `Absent`); `Err` if it had the wrong shape.
    pub(crate) fn take(&mut self) -> Result<Option<T>, Malformed> {
        match std::mem::take(self) {
            Field::Absent => Ok(None),
            Field::Valid(v) => Ok(Some(v)),
            Field::Invalid => Err(Malformed),
        }
    }

    /// The value if present and well-formed, ignoring a wrong shape (for fields that are only
    /// nice to have, where the rest of the resource is still trustworthy).
    pub(crate) fn ok(&self) -> Option<&T> {
        match self {
            Field::Valid(v) => Some(v),
            _ => None,
        }
    }
}

impl Field<String> {
    /// The string if present; `Err` if it was not a string.
    pub(crate) fn str(&self) -> Result<Option<&str>, Malformed> {
        self.get().map(|s| s.map(String::as_str))
    }
}

impl<T> Field<Vec<Field<T>>> {
    /// The elements, all of which must be well-formed; an absent list is empty.
    pub(crate) fn items(&self) -> Result<impl Iterator<Item = &T>, Malformed> {
        let list = self.get()?.map(Vec::as_slice).unwrap_or_default();
        if list.iter().any(|f| matches!(f, Field::Invalid)) {
            return Err(Malformed);
        }
        Ok(list.iter().filter_map(Field::ok))
    }

    /// The first well-formed element; `Err` if the list or any element is malformed.
    pub(crate) fn first(&self) -> Result<Option<&T>, Malformed> {
        Ok(self.items()?.next())
    }
}

/// A JSON number, kept as the text it denotes so values are shown as the source wrote them
/// (up to `f64` precision for non-integers).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decimal(pub(crate) String);

/// A type that can be read leniently from JSON. Each hook handles one JSON shape; the defaults
/// skip the value and report it as [`Field::Invalid`].
pub(crate) trait FromJson: Sized {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Field<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Invalid)
    }
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Field<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Invalid)
    }
    fn from_str(_: &str) -> Field<Self> {
        Field::Invalid
    }
    fn from_bool(_: bool) -> Field<Self> {
        Field::Invalid
    }
    fn from_number(_: String) -> Field<Self> {
        Field::Invalid
    }
}

impl FromJson for String {
    fn from_str(s: &str) -> Field<Self> {
        Field::Valid(s.to_owned())
    }
}

impl FromJson for bool {
    fn from_bool(b: bool) -> Field<Self> {
        Field::Valid(b)
    }
}

impl FromJson for Decimal {
    fn from_number(n: String) -> Field<Self> {
        Field::Valid(Decimal(n))
    }
}

impl<T: FromJson> FromJson for Vec<Field<T>> {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Field<Self>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(256));
        while let Some(item) = seq.next_element::<Field<T>>()? {
            if !matches!(item, Field::Absent) {
                items.push(item);
            }
        }
        Ok(Field::Valid(items))
    }
}

impl<T: FromJson> FromJson for Box<T> {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Field<Self>, A::Error> {
        Ok(match T::from_map(map)? {
            Field::Valid(v) => Field::Valid(Box::new(v)),
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        })
    }
}

/// Implements [`FromJson`] for structs whose fields are all [`Field`]s (derive `Deserialize` with
/// `#[serde(default)]`): a JSON object reads as the struct, anything else is invalid.
macro_rules! lenient_object {
    ($($ty:ty),* $(,)?) => {$(
        impl $crate::fhir::json::FromJson for $ty {
            fn from_map<'de, A: serde::de::MapAccess<'de>>(
                map: A,
            ) -> Result<$crate::fhir::json::Field<Self>, A::Error> {
                <$ty as serde::Deserialize>::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )
                .map($crate::fhir::json::Field::Valid)
            }
        }
    )*};
}
pub(crate) use lenient_object;

impl<'de, T: FromJson> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

impl<'de, T: FromJson> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(T::from_bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(T::from_number(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(T::from_number(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(T::from_number(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(T::from_str(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        T::from_seq(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default)]
    struct Thing {
        name: Field<String>,
        count: Field<Decimal>,
        flag: Field<bool>,
        tags: List<String>,
        inner: Field<Box<Thing>>,
    }
    lenient_object!(Thing);

    fn parse(json: &str) -> Field<Thing> {
        serde_json::from_str(json).expect("syntactically valid JSON")
    }

    #[test]
    fn well_formed_fields_are_valid() {
        let Field::Valid(t) = parse(
            r#"{"name":"a","count":7.5,"flag":true,"tags":["x","y"],"inner":{"name":"b"},"extra":{"deep":[1,2]}}"#,
        ) else {
            panic!("object should be valid");
        };
        assert_eq!(t.name.str(), Ok(Some("a")));
        assert_eq!(t.count, Field::Valid(Decimal("7.5".into())));
        assert_eq!(t.flag, Field::Valid(true));
        assert_eq!(
            t.tags.items().map(|i| i.cloned().collect::<Vec<_>>()),
            Ok(vec!["x".to_owned(), "y".to_owned()])
        );
        let inner = t.inner.get().ok().flatten().expect("inner");
        assert_eq!(inner.name.str(), Ok(Some("b")));
    }

    #[test]
    fn wrong_shapes_are_skipped_and_remembered_without_derailing_the_parser() {
        let Field::Valid(t) = parse(
            r#"{"name":{"nested":[1,{"a":2}]},"count":"7","flag":"yes","tags":["x",3,null],"inner":"text"}"#,
        ) else {
            panic!("object should be valid");
        };
        assert_eq!(t.name, Field::Invalid);
        assert_eq!(t.count, Field::Invalid);
        assert_eq!(t.flag, Field::Invalid);
        assert!(t.tags.items().is_err(), "one element is a number");
        assert!(matches!(t.inner, Field::Invalid));
    }

    #[test]
    fn null_is_absent_and_integers_keep_their_text() {
        let Field::Valid(t) = parse(r#"{"name":null,"count":48}"#) else {
            panic!("object should be valid");
        };
        assert_eq!(t.name, Field::Absent);
        assert_eq!(t.count, Field::Valid(Decimal("48".into())));
        assert_eq!(parse("[1]"), Field::Invalid);
    }

    #[test]
    fn syntax_errors_still_fail() {
        assert!(serde_json::from_str::<Field<Thing>>(r#"{"name": "a""#).is_err());
    }
}
