//! The network token: 32 random bytes shared by every node of a fleet.
//! Whoever holds it can announce servers to the balancers, so the file is
//! treated like an SSH private key: created 0600, refused when group or
//! others can read or write it, never printed.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

pub const TOKEN_LEN: usize = 32;

/// A network token, with its HMAC key prepared once (key setup hashes two
/// blocks; doing it per datagram would double the cost of junk).
#[derive(Clone)]
pub struct Token {
    bytes: [u8; TOKEN_LEN],
    key: hmac::Key,
}

impl Token {
    pub fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Token {
        Token {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            bytes,
        }
    }

    /// A fresh token from the operating system's CSPRNG.
    pub fn random() -> Result<Token, TokenError> {
        let mut bytes = [0u8; TOKEN_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenError::Random)?;
        Ok(Token::from_bytes(bytes))
    }

    /// A short public name for the token (first 4 bytes of a hash of it):
    /// lets operators compare tokens across machines in logs without
    /// revealing them.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"fleetgate token fingerprint\0");
        ctx.update(&self.bytes);
        hex(&ctx.finish().as_ref()[..4])
    }

    pub(crate) fn key(&self) -> &hmac::Key {
        &self.key
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(fingerprint {})", self.fingerprint())
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        // Not on any hot or exposed path, but no reason to leak timing.
        self.bytes
            .iter()
            .zip(&other.bytes)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Token {}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("network token file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "network token file {} already exists; refusing to overwrite it (every node \
         holding the old token would be cut off). Remove it first, or ask for overwrite \
         explicitly", path.display()
    )]
    Exists { path: PathBuf },
    #[error(
        "network token file {path} has mode {mode:04o}: group or others can read or \
         write it, and whoever reads it can announce servers to the balancers. \
         Fix: chmod 600 {path}", path = path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("network token file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "network token file {} must hold exactly 64 hex characters (a 32-byte \
         token, as written by `fleetgate token generate`): {detail}", path.display()
    )]
    Format { path: PathBuf, detail: String },
    #[error("the operating system's random generator failed")]
    Random,
}

/// Write a fresh token to `path` as 64 hex characters and a newline, mode
/// 0600. An existing file is kept and reported unless `overwrite`; then it
/// is replaced atomically (write beside it, rename), so a crash never
/// leaves a half-written token.
pub fn generate(path: &Path, overwrite: bool) -> Result<Token, TokenError> {
    let token = Token::random()?;
    let text = format!("{}\n", hex(&token.bytes));
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !overwrite {
        // create_new makes "does it exist?" and "create it" one step.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => TokenError::Exists {
                    path: path.to_path_buf(),
                },
                _ => io(e),
            })?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        return Ok(token);
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask can only clear bits, but be explicit about the result.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(token)
}

/// Read a token file, refusing one that group or others may access or
/// that does not hold exactly 64 hex characters (surrounding whitespace
/// is ignored). Messages name the file but never echo its content.
pub fn load(path: &Path) -> Result<Token, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    // Judge the file we opened, not whatever the path names a moment later.
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    // A token file is tiny: read a little more than a token could need so a
    // wrong path (a log file, a device) cannot make us read gigabytes.
    let mut text = String::new();
    f.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => TokenError::Format {
                path: path.to_path_buf(),
                detail: "the file is not text".into(),
            },
            _ => io(e),
        })?;
    parse_hex(text.trim()).map_err(|detail| TokenError::Format {
        path: path.to_path_buf(),
        detail,
    })
}

fn parse_hex(s: &str) -> Result<Token, String> {
    if s.len() != 2 * TOKEN_LEN {
        return Err(format!("found {} characters", s.chars().count()));
    }
    let mut bytes = [0u8; TOKEN_LEN];
    let digits = s.as_bytes();
    for (i, b) in bytes.iter_mut().enumerate() {
        let (Some(hi), Some(lo)) = (
            digits.get(2 * i).copied().and_then(nibble),
            digits.get(2 * i + 1).copied().and_then(nibble),
        ) else {
            return Err("found a character that is not a hex digit".into());
        };
        *b = hi << 4 | lo;
    }
    Ok(Token::from_bytes(bytes))
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("network.token");
        let t = generate(&p, false).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(text.ends_with('\n'));
        assert_eq!(load(&p).unwrap(), t);
    }

    #[test]
    fn generate_refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let first = generate(&p, false).unwrap();
        let err = generate(&p, false).unwrap_err();
        assert!(matches!(err, TokenError::Exists { .. }), "{err}");
        assert_eq!(load(&p).unwrap(), first, "the old token must be untouched");
        // Overwrite also tightens a file that was too open.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let second = generate(&p, true).unwrap();
        assert_ne!(first, second);
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(load(&p).unwrap(), second);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn load_refuses_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("network.token");
        generate(&p, false).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let msg = load(&p).unwrap_err().to_string();
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            load(&p).unwrap();
        }
    }

    #[test]
    fn load_refuses_bad_content_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let write = |s: &str| {
            std::fs::write(&p, s).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let good = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        write(&format!("  {good}\n\n"));
        load(&p).unwrap();
        for bad in [
            "",
            &good[..63],
            &format!("{good}0"),
            &format!("{}g", &good[..63]),
            &format!("{}é", &good[..62]),
            "secret-but-not-hex-secret-but-not-hex-secret-but-not-hex-secret!",
        ] {
            write(bad);
            let msg = load(&p).unwrap_err().to_string();
            assert!(msg.contains("64 hex characters"), "{msg}");
            assert!(!msg.contains("secret"), "content echoed: {msg}");
        }
        std::fs::write(&p, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(matches!(load(&p), Err(TokenError::Format { .. })));
    }

    #[test]
    fn load_reports_missing_file_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let msg = load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(msg.contains("nope"), "{msg}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(load(dir.path()), Err(TokenError::NotAFile { .. })));
    }

    #[test]
    fn debug_does_not_print_the_token() {
        let t = Token::from_bytes([0xab; 32]);
        let s = format!("{t:?}");
        assert!(!s.contains("abab"), "{s}");
        assert!(s.contains(&t.fingerprint()));
        assert_eq!(t.fingerprint().len(), 8);
    }
}
