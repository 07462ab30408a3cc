//! Any byte stream, cut into chunks at fuzzer-chosen points, through the watch line splitter,
//! compared with a reference model (split on '\n'; empty lines dropped; a line over the cap is
//! reported as skipped with its length including the newline; the unfinished tail is held).
#![no_main]
use edgeproxy::source::kube::lines::{LineSplitter, Piece};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Line(Vec<u8>),
    Skipped(usize),
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let max = 1 + usize::from(cut % 64);
    let step = 1 + usize::from(cut / 64);
    let mut s = LineSplitter::new(max);
    let mut got = Vec::new();
    for chunk in rest.chunks(step) {
        s.feed(chunk, &mut |p| {
            got.push(match p {
                Piece::Line(l) => Got::Line(l.to_vec()),
                Piece::Oversized(n) => Got::Skipped(n),
            });
            true
        });
    }
    let mut segments: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let tail = segments.pop().unwrap_or_default();
    let want: Vec<Got> = segments
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| if l.len() > max { Got::Skipped(l.len() + 1) } else { Got::Line(l.to_vec()) })
        .collect();
    assert_eq!(got, want, "max {max}, chunks of {step}");
    assert_eq!(s.mid_line(), !tail.is_empty());
});
