//! Request body fields read exactly as the OpenAPI document states them,
//! for every module whose types the API takes as JSON (`api`, `promo`).
//!
//! Integers in request bodies as JSON Schema (and so the OpenAPI document)
//! understands them: a number with no fractional part is an integer, so
//! `5.0` is taken as `5`. serde alone refuses `5.0` for an integer field,
//! which would answer 400 to a body the document calls valid. Used with
//! `#[serde(deserialize_with = ...)]` on every integer field a body takes.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// A media reference as the document describes it (the server reads it as
/// `herald_proto::model::Media`).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct MediaRef {
    /// Where the media lives: 1 to 2048 bytes.
    #[schema(min_length = 1, max_length = 2048)]
    pub url: String,
    /// Its MIME type, if known: at most 2048 bytes.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub mime: String,
}

/// The integer value of a JSON number, if it has one.
fn integral(n: &serde_json::Number) -> Option<i128> {
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = n.as_i64() {
        return Some(i128::from(i));
    }
    // Only floats exactly representable as integers (|x| <= 2^53).
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0).then_some(f as i128)
}

fn convert<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
    n: serde_json::Number,
) -> Result<T, D::Error> {
    let v = integral(&n).ok_or_else(|| D::Error::custom(format!("{n} is not an integer")))?;
    T::try_from(v).map_err(|_| D::Error::custom(format!("{n} is out of range")))
}

/// An integer field (also written `5.0`).
pub fn int<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    convert::<D, T>(serde_json::Number::deserialize(d)?)
}

/// An optional integer field (`null` or absent: `None`; give the field
/// `#[serde(default)]` too).
pub fn opt_int<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => convert::<D, T>(n).map(Some),
    }
}

/// An optional field that may be absent but not `null` (the document says
/// it is not nullable): absent is `None` (give it `#[serde(default)]`).
pub fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(deserialize_with = "super::int")]
        a: u32,
        #[serde(default, deserialize_with = "super::opt_int")]
        b: Option<i64>,
    }

    #[test]
    fn integral_floats_are_integers() {
        let t: T = serde_json::from_str(r#"{"a": 5.0, "b": -3}"#).unwrap();
        assert_eq!(t, T { a: 5, b: Some(-3) });
        let t: T = serde_json::from_str(r#"{"a": 7}"#).unwrap();
        assert_eq!(t.b, None);
        assert!(serde_json::from_str::<T>(r#"{"a": 5.5}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"a": -1}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"a": "5"}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"a": 1e300}"#).is_err());
        assert_eq!(
            serde_json::from_str::<T>(r#"{"a": 1, "b": null}"#)
                .unwrap()
                .b,
            None
        );
    }
}
