//! `--source file:PATH`: Services and endpoints from one JSON file (the same shapes `rules
//! --from` reads: an object, a typed list, or kubectl's `List` with mixed kinds).
//!
//! A thread polls the file's modification time and size (every second by default) and, when
//! they change, decodes it and sends one `Change::Replace` per kind (Service, EndpointSlice,
//! Endpoints), so objects that left the file are removed. A file that cannot be read or is not
//! a JSON document (cut short mid-write, say) is logged and ignored: the last good state stays,
//! and it is tried again on the next poll. Objects that fail to decode are logged and skipped,
//! the rest still count. It never touches the state or the kernel itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::{Sink, SourceEvent};
use crate::kube::objects::decode_document;
use crate::model::{Kind, Object};
use crate::state::Change;

/// Start polling `path` every `interval`; stops when `stop` is set.
pub fn spawn(path: PathBuf, interval: Duration, sink: Sink, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("source-file".into())
        .spawn(move || {
            let mut seen: Option<(Option<SystemTime>, u64)> = None;
            let mut synced = false;
            while !stop.load(Ordering::Relaxed) {
                poll_once(&path, &mut seen, &mut synced, &sink);
                sleep_until_stop(interval, &stop);
            }
        })
        .expect("spawning the file source thread")
}

fn sleep_until_stop(total: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

/// Read the file if it changed since `seen`; send its contents. Public for tests.
pub fn poll_once(path: &PathBuf, seen: &mut Option<(Option<SystemTime>, u64)>, synced: &mut bool, sink: &Sink) {
    let stamp = match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(e) => {
            if seen.is_some() || !*synced {
                let message = format!("{}: cannot read: {e}; keeping the last good state", path.display());
                log::error!("{message}");
                sink(SourceEvent::Error { kind: None, message });
            }
            // Report once per disappearance, not every second.
            *seen = None;
            *synced = true;
            return;
        }
    };
    if *seen == Some(stamp) {
        return;
    }
    // Recorded as seen before reading: a file that cannot be used is reported once, and again
    // only when it changes (not at every poll).
    *seen = Some(stamp);
    let bytes = match read_bounded(path) {
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
        log::warn!("{}: {e} (skipped)", path.display());
    }
    let kinds = [Kind::Service, Kind::EndpointSlice, Kind::Endpoints];
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
    for (kind, objects) in kinds.into_iter().zip(by_kind) {
        sink(SourceEvent::Change(Change::Replace(kind, objects)));
        if !*synced {
            sink(SourceEvent::Synced(kind));
        }
    }
    *synced = true;
}

/// The largest file the file source reads (a list of 10,000 Services and their slices is ~30 MB).
pub const MAX_FILE_BYTES: u64 = 128 << 20;

/// The file's bytes, refusing by size rather than reading a runaway file whole.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn bad_file_keeps_state_and_good_file_replaces() {
        let dir = std::env::temp_dir().join(format!("ep-file-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("objs.json");
        let events: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
        let ev = events.clone();
        let sink: Sink = Arc::new(move |e| ev.lock().unwrap().push(e));
        let (mut seen, mut synced) = (None, false);

        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Service","apiVersion":"v1","metadata":{"name":"a","namespace":"n"},"spec":{"clusterIP":"10.96.0.5","ports":[{"port":80}]}}]}"#).unwrap();
        poll_once(&path, &mut seen, &mut synced, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert!(matches!(&got[0], SourceEvent::Change(Change::Replace(Kind::Service, v)) if v.len() == 1), "{got:?}");
        assert!(got.contains(&SourceEvent::Synced(Kind::Service)));

        // Unchanged: nothing sent.
        poll_once(&path, &mut seen, &mut synced, &sink);
        assert!(events.lock().unwrap().is_empty());

        // Cut short: an error, no change.
        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Serv"#).unwrap();
        poll_once(&path, &mut seen, &mut synced, &sink);
        let got = std::mem::take(&mut *events.lock().unwrap());
        assert!(got.iter().all(|e| matches!(e, SourceEvent::Error { .. })) && !got.is_empty(), "{got:?}");

        // Still broken, unchanged: reported once, not at every poll.
        for _ in 0..5 {
            poll_once(&path, &mut seen, &mut synced, &sink);
        }
        assert!(events.lock().unwrap().is_empty(), "{:?}", events.lock().unwrap());
        // Changed (still broken): reported again.
        std::fs::write(&path, r#"{"kind":"List","items":[{"kind":"Servi"#).unwrap();
        poll_once(&path, &mut seen, &mut synced, &sink);
        assert_eq!(std::mem::take(&mut *events.lock().unwrap()).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
