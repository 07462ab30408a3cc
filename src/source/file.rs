//! `--source file:PATH`: Services and endpoints from one JSON file (the same shapes `rules
//! --from` reads: an object, a typed list, or kubectl's `List` with mixed kinds).
//!
//! A thread polls the file's modification time and size (every second by default) and, when
//! they change, decodes it and sends one `Change::Replace` per kind (Service, EndpointSlice,
//! Endpoints), so objects that left the file are removed. A file that cannot be read or is not
//! a JSON document (cut short mid-write, say) is logged and ignored: the last good state stays,
//! and it is tried again on the next poll. Objects that fail to decode are logged and skipped,
//! the rest still count. It never touches the state or the kernel itself.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::{Sink, SourceEvent};
use crate::model::{Kind, Object, ObjectKey};
use crate::source::kube::objects::decode_document;
use crate::state::Change;
use crate::stop::Stop;

/// Start polling `path` every `interval`; stops when `stop` is set.
pub fn spawn(path: PathBuf, interval: Duration, sink: Sink, stop: Stop) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("source-file".into()).spawn(move || {
        let mut watched = Watched::default();
        loop {
            poll_once(&path, &mut watched, &sink);
            if !stop.sleep(interval) {
                break;
            }
        }
    })
}

/// What the poller remembers about the file between polls.
#[derive(Debug, Default)]
pub struct Watched {
    /// Modification time and size of the version last read (`None`: none, or it went away).
    seen: Option<(Option<SystemTime>, u64)>,
    /// A complete file has been delivered (readiness: sent once, with the first good read).
    synced: bool,
    /// The file's absence has been reported (once per disappearance, not at every poll).
    missing_reported: bool,
}

/// Read the file if it changed since it was last seen; send its contents. Public for tests.
pub fn poll_once(path: &PathBuf, w: &mut Watched, sink: &Sink) {
    let stamp = match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(e) => {
            if !w.missing_reported {
                let message = format!("{}: cannot read: {e}; keeping the last good state", path.display());
                log::error!("{message}");
                sink(SourceEvent::Error { kind: None, message });
                w.missing_reported = true;
            }
            w.seen = None;
            return;
        }
    };
    w.missing_reported = false;
    let seen = &mut w.seen;
    if *seen == Some(stamp) {
        return;
    }
    // Recorded as seen before reading: a file that cannot be used is reported once, and again
    // only when it changes (not at every poll).
    *seen = Some(stamp);
    let bytes = match crate::capped::read(path, MAX_FILE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            let message = format!("{}: cannot read: {e}; keeping the last good state", path.display());
            log::error!("{message}");
            sink(SourceEvent::Error { kind: None, message });
            return;
        }
    };
    let decoded = decode_document(&bytes, None);
    if let Some(e) = &decoded.document_error {
        let message = format!("{}: {e}; keeping the last good state", path.display());
        log::error!("{message}");
        sink(SourceEvent::Error { kind: None, message });
        return;
    }
    for e in &decoded.errors {
        log::warn!("{}: {e} (skipped; its last good version stays)", path.display());
    }
    let kinds = [Kind::Service, Kind::EndpointSlice, Kind::Endpoints];
    // Objects that failed to decode are still in the file: their last good version must stay,
    // as with the API source. Their keys, per kind (an error without a kind counts for each);
    // an error without a readable name means nothing may be deleted on this read.
    let unnamed = decoded.errors.iter().any(|e| e.key.is_none());
    let bad_keys = |kind: Kind| -> Vec<ObjectKey> {
        decoded.errors.iter().filter(|e| e.kind.is_none_or(|k| k == kind)).filter_map(|e| e.key.clone()).collect()
    };
    let bad: [Vec<ObjectKey>; 3] = [bad_keys(kinds[0]), bad_keys(kinds[1]), bad_keys(kinds[2])];
    let mut by_kind: [Vec<Object>; 3] = Default::default();
    for o in decoded.objects {
        let i = kinds.iter().position(|k| *k == o.kind()).expect("every object has one of the three kinds");
        by_kind[i].push(o);
    }
    log::info!(
        "{}: {} services, {} endpoint slices, {} endpoints",
        path.display(),
        by_kind[0].len(),
        by_kind[1].len(),
        by_kind[2].len()
    );
    for ((kind, objects), bad) in kinds.into_iter().zip(by_kind).zip(bad) {
        if !unnamed && bad.is_empty() {
            sink(SourceEvent::Change(Change::Replace(kind, objects)));
        } else {
            let mut keep: Vec<ObjectKey> = objects.iter().map(|o| o.key().clone()).collect();
            keep.extend(bad);
            for o in objects {
                sink(SourceEvent::Change(Change::Upsert(o)));
            }
            if !unnamed {
                sink(SourceEvent::Change(Change::Retain(kind, keep)));
            }
        }
        if !w.synced {
            sink(SourceEvent::Synced(kind));
        }
    }
    w.synced = true;
}

/// The largest file the file source reads (a list of 10,000 Services and their slices is ~30 MB).
pub const MAX_FILE_BYTES: u64 = 128 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn bad_file_keeps_state_and_good_file_replaces() {
        let dir = std::env::temp_dir().join(format!("ep-file-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("objs.json");
        let events: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
        let ev = events.clone();
        let sink: Sink = Arc::new(move |e| ev.lock().unwrap().push(e));
        let mut w = Watched::default();

        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Service","apiVersion":"v1","metadata":{"name":"a","namespace":"n"},"spec":{"clusterIP":"10.96.0.5","ports":[{"port":80}]}}]}"#).unwrap();
        poll_once(&path, &mut w, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert!(matches!(&got[0], SourceEvent::Change(Change::Replace(Kind::Service, v)) if v.len() == 1), "{got:?}");
        assert!(got.contains(&SourceEvent::Synced(Kind::Service)));

        // Unchanged: nothing sent.
        poll_once(&path, &mut w, &sink);
        assert!(events.lock().unwrap().is_empty());

        // Cut short: an error, no change.
        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Serv"#).unwrap();
        poll_once(&path, &mut w, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert!(got.iter().all(|e| matches!(e, SourceEvent::Error { .. })) && !got.is_empty(), "{got:?}");

        // Still broken, unchanged: reported once, not at every poll.
        for _ in 0..5 {
            poll_once(&path, &mut w, &sink);
        }
        assert!(events.lock().unwrap().is_empty(), "{:?}", events.lock().unwrap());
        // Changed (still broken): reported again.
        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Servi"#).unwrap();
        poll_once(&path, &mut w, &sink);
        assert_eq!(std::mem::take(&mut *events.lock().unwrap()).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn collect() -> (Sink, Arc<Mutex<Vec<SourceEvent>>>) {
        let events: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
        let ev = events.clone();
        (Arc::new(move |e| ev.lock().unwrap().push(e)), events)
    }

    /// Missing at start: reported once (not every poll), and ready as soon as it appears.
    #[test]
    fn a_file_missing_at_start_is_ready_once_it_appears() {
        let dir = std::env::temp_dir().join(format!("ep-file-late-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("late.json");
        let (sink, events) = collect();
        let mut w = Watched::default();
        for _ in 0..5 {
            poll_once(&path, &mut w, &sink);
        }
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert_eq!(got.len(), 1, "reported once: {got:?}");
        assert!(matches!(&got[0], SourceEvent::Error { message, .. } if message.contains("cannot read")));
        std::fs::write(&path, r#"{"kind":"ServiceList","items":[]}"#).unwrap();
        poll_once(&path, &mut w, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Endpoints] {
            assert!(got.contains(&SourceEvent::Synced(kind)), "{kind}: {got:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An object that turns invalid keeps its last good version (as with the API source): the
    /// read sends upserts and a Retain that includes its key, never a Replace without it.
    #[test]
    fn an_object_that_turns_invalid_keeps_its_last_good_version() {
        let dir = std::env::temp_dir().join(format!("ep-file-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("objs.json");
        let svc = |name: &str, ip: &str| {
            format!(
                r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"n"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}]}}}}"#
            )
        };
        let (sink, events) = collect();
        let mut w = Watched::default();
        std::fs::write(
            &path,
            format!(r#"{{"kind":"List","items":[{},{}]}}"#, svc("a", "10.96.0.5"), svc("b", "10.96.0.6")),
        )
        .unwrap();
        poll_once(&path, &mut w, &sink);
        events.lock().unwrap().clear();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            &path,
            format!(r#"{{"kind":"List","items":[{},{}]}}"#, svc("a", "10.96.0.5"), svc("b", "127.0.0.1")),
        )
        .unwrap();
        poll_once(&path, &mut w, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert!(!got.iter().any(|e| matches!(e, SourceEvent::Change(Change::Replace(Kind::Service, _)))), "{got:?}");
        let retained = got.iter().find_map(|e| match e {
            SourceEvent::Change(Change::Retain(Kind::Service, keys)) => Some(keys.clone()),
            _ => None,
        });
        let keys = retained.expect("a Retain for services");
        assert!(keys.contains(&ObjectKey::new("n", "a")) && keys.contains(&ObjectKey::new("n", "b")), "{keys:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
