//! Any bytes as one watch event line, for each kind: never a panic.
#![no_main]
use edgeproxy::source::kube::watch::decode_watch_line;
use edgeproxy::model::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Endpoints] {
        let _ = decode_watch_line(data, kind);
    }
});
