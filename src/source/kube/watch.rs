//! Watch streams, one line at a time: [`decode_watch_line`] turns a line into a [`WatchLine`]
//! (the [`WatchEvent`] and the resourceVersion it carries), or says why it cannot be used.
//!
//! An `ADDED` or `MODIFIED` object goes through the same decoding as a listed one (`objects`); a
//! `DELETED` one needs only its key, so a delete goes through even for an object that could not
//! be parsed; `ERROR` events carry a [`Status`], which is also what error responses hold.

use std::fmt;

use serde::Deserialize;

use super::names;
use super::objects::{decode_item, key_of, ObjectError};
use super::raw::{MetaOnly, RawEvent};
use crate::intern::Interner;
use crate::model::{Kind, Object, ObjectKey};

/// A `metav1.Status`, as returned with 4xx/5xx responses and in watch `ERROR` events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

impl Status {
    /// `410 Gone` / `Expired`: the resourceVersion is too old; relist.
    pub fn is_expired(&self) -> bool {
        self.code == 410 || self.reason == "Expired" || self.reason == "Gone"
    }
}

/// One watch event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Added(Object),
    Modified(Object),
    /// Only the key is decoded: a delete must go through even for an object we could not parse.
    Deleted(Kind, ObjectKey),
    Bookmark,
    Error(Status),
}

/// A decoded watch line: the event and the resourceVersion it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchLine {
    pub event: WatchEvent,
    pub resource_version: Option<String>,
}

/// Why a watch line could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not a JSON watch event at all (garbage, truncated line).
    Garbage(String),
    /// A well-formed event whose object is bad; the event is skipped.
    Object(ObjectError),
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::Garbage(m) => write!(f, "unusable watch line: {m}"),
            LineError::Object(e) => write!(f, "skipped watch event: {e}"),
        }
    }
}

/// Decode one line of a watch stream of `kind` objects.
pub fn decode_watch_line(line: &[u8], kind: Kind) -> Result<WatchLine, LineError> {
    let text = std::str::from_utf8(line).map_err(|_| LineError::Garbage("not UTF-8".into()))?;
    let ev: RawEvent = serde_json::from_str(text).map_err(|e| LineError::Garbage(e.to_string()))?;
    let object = ev.object.ok_or_else(|| LineError::Garbage("event without an object".into()))?;
    let rv = || serde_json::from_str::<MetaOnly>(object.get()).ok().and_then(|m| m.metadata.resource_version);
    let event = match ev.event_type.as_str() {
        "ADDED" | "MODIFIED" => {
            let obj = decode_item(object, Some(kind), "the event object").map_err(LineError::Object)?;
            match ev.event_type.as_str() {
                "ADDED" => WatchEvent::Added(obj),
                _ => WatchEvent::Modified(obj),
            }
        }
        "DELETED" => {
            let meta = serde_json::from_str::<MetaOnly>(object.get())
                .map_err(|e| LineError::Garbage(format!("DELETED object without metadata: {e}")))?
                .metadata;
            let rule = if kind == Kind::Service { names::dns1123_label } else { names::dns1123_subdomain };
            let key = key_of(&meta, &mut Interner::default(), rule).map_err(|(field, message)| {
                LineError::Object(ObjectError {
                    kind: Some(kind),
                    object: "DELETED object".into(),
                    key: None,
                    field,
                    message,
                })
            })?;
            WatchEvent::Deleted(kind, key)
        }
        "BOOKMARK" => WatchEvent::Bookmark,
        "ERROR" => {
            let status: Status = serde_json::from_str(object.get())
                .map_err(|e| LineError::Garbage(format!("ERROR event without a Status: {e}")))?;
            return Ok(WatchLine { event: WatchEvent::Error(status), resource_version: None });
        }
        other => return Err(LineError::Garbage(format!("unknown event type {other:?}"))),
    };
    Ok(WatchLine { event, resource_version: rv() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookmark_and_error_lines() {
        let b = br#"{"type":"BOOKMARK","object":{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"548","creationTimestamp":null},"spec":{},"status":{"loadBalancer":{}}}}"#;
        let l = decode_watch_line(b, Kind::Service).unwrap();
        assert_eq!(l.event, WatchEvent::Bookmark);
        assert_eq!(l.resource_version.as_deref(), Some("548"));
        let e = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 553 (563)","reason":"Expired","code":410}}"#;
        let WatchEvent::Error(s) = decode_watch_line(e, Kind::Service).unwrap().event else { panic!() };
        assert!(s.is_expired());
        assert!(matches!(decode_watch_line(b"{\"type\":", Kind::Service), Err(LineError::Garbage(_))));
    }
}
