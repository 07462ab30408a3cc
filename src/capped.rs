//! Reading a file with a size cap: never more than one byte past the cap is read, so a runaway
//! file (or a link to a device) is refused by its size, not loaded whole. Used for every file
//! edgeproxy reads from its users: the config, kubeconfigs, the file source.

use std::io::{self, Read};
use std::path::Path;

/// The whole file, or an error of kind `InvalidData` ("larger than N bytes") past `max`.
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read(path, max)?).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_reads_up_to_it() {
        let path = std::env::temp_dir().join(format!("ep-capped-{}", std::process::id()));
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read(&path, 5).unwrap(), b"12345");
        assert_eq!(read_text(&path, 5).unwrap(), "12345");
        let e = read(&path, 4).unwrap_err();
        assert_eq!((e.kind(), e.to_string()), (io::ErrorKind::InvalidData, "larger than 4 bytes".to_string()));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(read_text(&path, 5).unwrap_err().to_string(), "not UTF-8 text");
        std::fs::remove_file(&path).unwrap();
    }
}
