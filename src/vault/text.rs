//! Turning the bytes of a secret file or variable into a [`Secret`]: size cap,
//! UTF-8 without NUL bytes, one trailing newline trimmed, not empty. Rejected
//! bytes are zeroized; problems are described without quoting any of the value.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use zeroize::Zeroize;

use super::{Secret, VaultError};

/// Secrets are keys and tokens; anything bigger is a mistake (a wrong file).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Why bytes are not a usable secret, worded to follow "is unusable: ".
pub fn decode(mut bytes: Vec<u8>) -> Result<Secret, &'static str> {
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        bytes.zeroize();
        return Err("it is larger than 64 KiB");
    }
    // Editors and `echo` add one newline; a value never ends with one on purpose.
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        return Err("it is empty");
    }
    // Environment values are C strings: a NUL would silently cut the value
    // short in the child, or make the spawn fail long after `check` passed.
    if bytes.contains(&0) {
        bytes.zeroize();
        return Err("it contains a NUL byte");
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Secret::new(text)),
        Err(err) => {
            err.into_bytes().zeroize();
            Err("it is not UTF-8 text")
        }
    }
}

/// Reads a secret from an opened file that must be a regular file.
pub fn read_file(file: File, agent: &str, name: &str, path: &Path) -> Result<Secret, VaultError> {
    let location = format!("`{}`", path.display());
    let unusable = |problem: &str| VaultError::Unusable {
        agent: agent.to_owned(),
        name: name.to_owned(),
        location: location.clone(),
        problem: problem.to_owned(),
    };
    let meta = file.metadata().map_err(|source| VaultError::Io {
        agent: agent.to_owned(),
        name: name.to_owned(),
        location: location.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(unusable("it is not a regular file"));
    }
    let mut bytes = Vec::new();
    if let Err(source) = file.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes) {
        bytes.zeroize();
        return Err(VaultError::Io {
            agent: agent.to_owned(),
            name: name.to_owned(),
            location,
            source,
        });
    }
    decode(bytes).map_err(unusable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        let cases: &[(&[u8], Result<&str, &str>)] = &[
            (b"sk-abc", Ok("sk-abc")),
            (b"sk-abc\n", Ok("sk-abc")),
            (b"sk-abc\r\n", Ok("sk-abc")),
            (b"sk-abc\n\n", Ok("sk-abc\n")),
            (b" spaced \n", Ok(" spaced ")),
            (b"", Err("it is empty")),
            (b"\n", Err("it is empty")),
            (b"\r\n", Err("it is empty")),
            (b"\xff\xfe", Err("it is not UTF-8 text")),
            // A child's environment is C strings: a NUL would cut the value short.
            (b"sk-a\0b", Err("it contains a NUL byte")),
            (b"\0", Err("it contains a NUL byte")),
            (b"\xff\0", Err("it contains a NUL byte")),
        ];
        for (bytes, want) in cases {
            let got = decode(bytes.to_vec());
            assert_eq!(
                got.as_ref().map(Secret::expose).map_err(|e| *e),
                *want,
                "{bytes:?}"
            );
        }
        let big = vec![b'x'; MAX_SECRET_BYTES as usize + 1];
        assert_eq!(decode(big).unwrap_err(), "it is larger than 64 KiB");
        assert!(decode(vec![b'x'; MAX_SECRET_BYTES as usize]).is_ok());
    }
}
