//! The serde shapes of the API server's JSON: only the fields edgeproxy reads.
//!
//! `Raw*` mirror the Kubernetes objects (Service, EndpointSlice, core/v1 Endpoints, their
//! metadata, a watch event) as written, unvalidated; `objects` turns them into `model` types and
//! decides what is valid. Strings that are read once per item borrow from the input ([`Text`]):
//! a copy is made only for what is kept, or when the JSON string has escapes. The document seeds
//! ([`TopSeed`]) stream through a document's top level and keep each list item as borrowed raw
//! JSON, so a document cut short still yields the items before the cut.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A JSON string, borrowed from the input unless it has escapes. (serde's own `Cow` support
/// borrows only for a field that is exactly `Cow<str>`, not inside `Option`, `Vec` or maps.)
#[derive(Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawMeta<'a> {
    #[serde(borrow)]
    pub(super) name: Text<'a>,
    #[serde(borrow)]
    pub(super) namespace: Text<'a>,
    pub(super) resource_version: Option<String>,
    #[serde(borrow)]
    pub(super) labels: Option<BTreeMap<Text<'a>, Text<'a>>>,
    #[serde(borrow)]
    pub(super) annotations: Option<BTreeMap<Text<'a>, Text<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawListMeta {
    pub(super) resource_version: Option<String>,
    #[serde(rename = "continue")]
    pub(super) continue_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawServicePort<'a> {
    #[serde(default, borrow)]
    pub(super) name: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(super) protocol: Option<Text<'a>>,
    pub(super) port: i64,
    #[serde(default)]
    pub(super) target_port: Option<IntOrString>,
    #[serde(default)]
    pub(super) node_port: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawClientIp {
    #[serde(rename = "timeoutSeconds")]
    pub(super) timeout_seconds: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawAffinityConfig {
    #[serde(rename = "clientIP")]
    pub(super) client_ip: Option<RawClientIp>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawServiceSpec<'a> {
    #[serde(rename = "type")]
    pub(super) service_type: Option<String>,
    #[serde(rename = "clusterIP")]
    pub(super) cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub(super) cluster_ips: Option<Vec<String>>,
    #[serde(borrow)]
    pub(super) ports: Option<Vec<RawServicePort<'a>>>,
    pub(super) session_affinity: Option<String>,
    pub(super) session_affinity_config: Option<RawAffinityConfig>,
    pub(super) internal_traffic_policy: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct RawService<'a> {
    #[serde(default)]
    pub(super) kind: Option<String>,
    #[serde(default, borrow)]
    pub(super) metadata: RawMeta<'a>,
    #[serde(default, borrow)]
    pub(super) spec: RawServiceSpec<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawConditions {
    pub(super) ready: Option<bool>,
    pub(super) serving: Option<bool>,
    pub(super) terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawSliceEndpoint<'a> {
    #[serde(default, borrow)]
    pub(super) addresses: Addresses<'a>,
    #[serde(default)]
    pub(super) conditions: RawConditions,
    #[serde(default, borrow)]
    pub(super) node_name: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(super) zone: Option<Text<'a>>,
}

/// An endpoint's `addresses`: almost always exactly one, so the first is kept inline and only
/// further ones (informational, but still validated) take an allocation.
#[derive(Default)]
pub(super) struct Addresses<'a> {
    first: Option<Text<'a>>,
    rest: Vec<Text<'a>>,
}

impl<'a> Addresses<'a> {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Text<'a>> {
        self.first.iter().chain(self.rest.iter())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Addresses<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Addresses<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of addresses")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Addresses<'a>, S::Error> {
                let mut out = Addresses { first: seq.next_element()?, rest: Vec::new() };
                while let Some(a) = seq.next_element()? {
                    out.rest.push(a);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
pub(super) struct RawPort<'a> {
    #[serde(default, borrow)]
    pub(super) name: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(super) protocol: Option<Text<'a>>,
    #[serde(default)]
    pub(super) port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawSlice<'a> {
    #[serde(default)]
    pub(super) kind: Option<String>,
    #[serde(default, borrow)]
    pub(super) metadata: RawMeta<'a>,
    #[serde(default)]
    pub(super) address_type: Option<String>,
    #[serde(default, borrow)]
    pub(super) endpoints: Option<Vec<RawSliceEndpoint<'a>>>,
    #[serde(default, borrow)]
    pub(super) ports: Option<Vec<RawPort<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawAddress<'a> {
    #[serde(borrow)]
    pub(super) ip: Text<'a>,
    #[serde(default, borrow)]
    pub(super) node_name: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawSubset<'a> {
    #[serde(borrow)]
    pub(super) addresses: Option<Vec<RawAddress<'a>>>,
    #[serde(borrow)]
    pub(super) not_ready_addresses: Option<Vec<RawAddress<'a>>>,
    #[serde(borrow)]
    pub(super) ports: Option<Vec<RawPort<'a>>>,
}

#[derive(Deserialize)]
pub(super) struct RawEndpoints<'a> {
    #[serde(default)]
    pub(super) kind: Option<String>,
    #[serde(default, borrow)]
    pub(super) metadata: RawMeta<'a>,
    #[serde(default, borrow)]
    pub(super) subsets: Option<Vec<RawSubset<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct KindOnly {
    pub(super) kind: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct MetaOnly<'a> {
    #[serde(borrow)]
    pub(super) metadata: RawMeta<'a>,
}

/// One line of a watch stream: the event type and its object, kept raw until the type says
/// how to decode it.
#[derive(Deserialize)]
pub(super) struct RawEvent<'a> {
    #[serde(rename = "type")]
    pub(super) event_type: String,
    #[serde(borrow)]
    pub(super) object: Option<&'a RawValue>,
}

// ---- documents ---------------------------------------------------------------------------------

/// Top-level fields collected while streaming through a document; items are borrowed from the
/// input and kept even when the document breaks off later.
#[derive(Default)]
pub(super) struct Top<'a> {
    pub(super) kind: Option<String>,
    pub(super) meta: RawListMeta,
    pub(super) items: Vec<&'a RawValue>,
    pub(super) has_items: bool,
}

/// Streams through a document's top level into a [`Top`].
pub(super) struct TopSeed<'t, 'a>(pub(super) &'t mut Top<'a>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for TopSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for TopSeed<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object or list")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "kind" => self.0.kind = map.next_value()?,
                "metadata" => self.0.meta = map.next_value()?,
                "items" => {
                    self.0.has_items = true;
                    map.next_value_seed(ItemsSeed(&mut self.0.items))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Keeps each item of `items` as borrowed raw JSON, one at a time.
struct ItemsSeed<'t, 'a>(&'t mut Vec<&'a RawValue>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for ItemsSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ItemsSeed<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of items")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(()) // "items": null
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(item) = seq.next_element::<&RawValue>()? {
            self.0.push(item);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_borrows_unless_escaped_also_inside_containers() {
        let m: BTreeMap<Text, Option<Text>> = serde_json::from_str(r#"{"plain":"v","esc\u0041":"x\ny"}"#).unwrap();
        let (k1, v1) = m.iter().find(|(k, _)| &***k == "plain").unwrap();
        assert!(matches!((&k1.0, &v1.as_ref().unwrap().0), (Cow::Borrowed(_), Cow::Borrowed("v"))));
        let (k2, v2) = m.iter().find(|(k, _)| &***k == "escA").unwrap();
        assert!(matches!((&k2.0, &v2.as_ref().unwrap().0), (Cow::Owned(_), Cow::Owned(_))));
        assert_eq!(&**v2.as_ref().unwrap(), "x\ny");
    }
}
