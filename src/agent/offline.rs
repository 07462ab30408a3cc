//! The offline cache from the agent's side: read at start, written (on a thread of its own) when
//! the state changed, at most every [`CACHE_PERIOD`].

use std::time::Duration;

use crate::config::Config;
use crate::source::cache;
use crate::state::State;

/// How often the offline cache is written at most (when the state changed).
pub(super) const CACHE_PERIOD: Duration = Duration::from_secs(5);

/// The offline cache, when there is one to fall back on (said in the log either way).
pub(super) fn read_cache(config: &Config) -> Option<cache::Cached> {
    let dir = config.state_dir.as_ref()?;
    match cache::read(dir) {
        Ok(c) => {
            log::info!(
                "offline cache {}: {} objects written {}{}",
                dir.join(cache::FILE).display(),
                c.objects.len(),
                c.written,
                if c.skipped.is_empty() { String::new() } else { format!("; {} unusable, skipped", c.skipped.len()) }
            );
            for s in &c.skipped {
                log::warn!("offline cache: {s} (skipped)");
            }
            Some(c)
        }
        Err(cache::CacheError::Missing) => None,
        Err(e) => {
            log::warn!("offline cache {}: {e}; not used", dir.join(cache::FILE).display());
            None
        }
    }
}

/// Write the state as the offline cache, on a thread of its own (fsync may take a while on
/// flash).
pub(super) fn write_cache(dir: &std::path::Path, state: &State) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let text = cache::encode(state.snapshot(), &crate::logging::rfc3339(now));
    let dir = dir.to_path_buf();
    let spawned = std::thread::Builder::new().name("cache".into()).spawn(move || match cache::write(&dir, &text) {
        Ok(path) => log::debug!("offline cache written: {} ({} bytes)", path.display(), text.len()),
        Err(e) => log::warn!("offline cache in {}: {e}", dir.display()),
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the cache writer: {e}");
    }
}
