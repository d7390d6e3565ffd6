//! TLS 1.3 application records without rustls' connection state: what an
//! established connection keeps once it waits idle (server_stream.rs).
//!
//! After the handshake, rustls' connection holds far more than protecting
//! records needs: its handshake deframer's span list, the client's
//! certificate chain, QUIC and early-data state, record queues, the key
//! schedule's state machine: about 2.6 KiB per connection besides the two
//! AEAD keys, for as long as the connection lives. Tens of thousands of
//! devices hold command channels open for hours, so an idle TLS 1.3
//! connection drops all of it and keeps only this: each direction's AEAD
//! key, IV, sequence number and traffic secret (RFC 8446 5.2, 5.3, 7.1,
//! 7.2), with ring doing the cryptography.
//!
//! rustls hands over the keys and sequence numbers
//! (`dangerous_into_kernel_connection`, the kTLS entry point). The traffic
//! secrets, which a key update needs, come from the server configuration's
//! key log ([`SecretCapture`]), which rustls tells the connection's
//! application traffic secrets; they are checked against the keys rustls
//! hands over, so a secret logged for another connection (a client
//! reusing a ClientHello random) can never be used.
//!
//! Key updates are followed both ways: the client's (and one of our own
//! when it asks for it), and ours before the sending key's sequence number
//! gets near the AEAD's confidentiality limit, as rustls does.

use std::collections::HashMap;
use std::io;
use std::sync::{LazyLock, Mutex, MutexGuard};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, KeyLog};

/// The ClientHello's random: what the key log names a connection by.
pub type ClientRandom = [u8; 32];

const CLIENT_LABEL: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_LABEL: &str = "SERVER_TRAFFIC_SECRET_0";

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// RFC 8446 5.2: at most 2^14 + 256 bytes of ciphertext per record.
const MAX_CIPHERTEXT: usize = (1 << 14) + 256;
/// Our own key update comes before the sending key has protected this many
/// records: below AES-GCM's limit (2^24.5, RFC 8446 5.5).
const TX_UPDATE_AT: u64 = 1 << 23;
/// How many key updates rustls may have followed before the connection
/// went idle, for the logged secret 0 to be brought up to date.
const MAX_EARLIER_UPDATES: usize = 64;
/// At most this many connections' secrets wait to be taken (from the
/// server's Finished to the end of the handshake). A handshake whose
/// ClientHello fleetgate's parser could not read (rustls accepts one kind,
/// a server name with a trailing dot) leaves its secrets behind: past this
/// many, they are all dropped, and the connections whose secrets went with
/// them keep rustls' state instead.
const MAX_WAITING: usize = 65_536;

/// One traffic secret (SHA-256 or SHA-384 long).
#[derive(Clone)]
struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Secret {
    fn new(bytes: &[u8]) -> Option<Secret> {
        let mut s = Secret {
            bytes: [0; 48],
            len: u8::try_from(bytes.len()).ok()?,
        };
        s.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(s)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

/// A connection's application traffic secrets as the key log told them.
pub struct Secrets {
    client: Option<Secret>,
    server: Option<Secret>,
}

/// Secrets logged and not yet taken: an entry lives from the server's
/// Finished to the end of the handshake.
fn captured() -> MutexGuard<'static, HashMap<ClientRandom, Secrets>> {
    static CAPTURED: LazyLock<Mutex<HashMap<ClientRandom, Secrets>>> =
        LazyLock::new(Mutex::default);
    CAPTURED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key log of the offload listeners' server configurations: it keeps
/// each connection's application traffic secrets until the connection
/// takes them ([`take_secrets`]) at the end of its handshake, or drops
/// them if the handshake fails ([`forget_secrets`]). Nothing is written
/// anywhere.
#[derive(Debug, Default)]
pub struct SecretCapture;

impl KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_LABEL || label == SERVER_LABEL
    }

    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let (Ok(random), Some(secret)) =
            (ClientRandom::try_from(client_random), Secret::new(secret))
        else {
            return;
        };
        let mut map = captured();
        if map.len() >= MAX_WAITING && !map.contains_key(&random) {
            map.clear();
        }
        let entry = map.entry(random).or_insert(Secrets {
            client: None,
            server: None,
        });
        match label {
            CLIENT_LABEL => entry.client = Some(secret),
            SERVER_LABEL => entry.server = Some(secret),
            _ => {}
        }
    }
}

/// The secrets logged for the connection whose ClientHello had `random`.
pub fn take_secrets(random: &ClientRandom) -> Option<Secrets> {
    captured().remove(random)
}

/// Drop what was logged for a handshake that did not complete.
pub fn forget_secrets(random: &ClientRandom) {
    captured().remove(random);
}

/// The TLS 1.3 suites ring implements, with what their keys need.
#[derive(Clone, Copy)]
struct Suite {
    aead: &'static aead::Algorithm,
    hkdf: hkdf::Algorithm,
}

impl Suite {
    fn of(suite: CipherSuite) -> Option<Suite> {
        let (aead, hkdf) = match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => (&aead::AES_128_GCM, hkdf::HKDF_SHA256),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => (&aead::AES_256_GCM, hkdf::HKDF_SHA384),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => {
                (&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256)
            }
            _ => return None,
        };
        Some(Suite { aead, hkdf })
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", len), RFC 8446 7.1.
fn expand_label(hkdf: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let prk = hkdf::Prk::new_less_safe(hkdf, secret);
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("TLS 1.3 keys are far below HKDF's output limit");
}

/// One direction's protection.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    secret: Secret,
}

impl Direction {
    fn new(suite: Suite, secret: Secret, seq: u64) -> Direction {
        let (key, iv) = key_and_iv(suite, &secret);
        let key = UnboundKey::new(suite.aead, &key[..suite.aead.key_len()])
            .expect("the key has the algorithm's length");
        Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
            secret,
        }
    }

    /// RFC 8446 7.2: the next generation of this direction's secret.
    fn update(&mut self, suite: Suite) {
        *self = Direction::new(suite, next_secret(suite, &self.secret), 0);
    }

    fn nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn key_and_iv(suite: Suite, secret: &Secret) -> ([u8; 32], [u8; aead::NONCE_LEN]) {
    let mut key = [0u8; 32];
    let mut iv = [0u8; aead::NONCE_LEN];
    let len = suite.aead.key_len();
    expand_label(suite.hkdf, secret.as_bytes(), b"key", &mut key[..len]);
    expand_label(suite.hkdf, secret.as_bytes(), b"iv", &mut iv);
    (key, iv)
}

fn next_secret(suite: Suite, secret: &Secret) -> Secret {
    let mut next = Secret {
        bytes: [0; 48],
        len: secret.len,
    };
    let len = usize::from(secret.len);
    expand_label(
        suite.hkdf,
        secret.as_bytes(),
        b"traffic upd",
        &mut next.bytes[..len],
    );
    next
}

/// The generation of `secret` whose key and IV are `want`'s, if one of the
/// first few is.
fn current_secret(
    suite: Suite,
    mut secret: Secret,
    want: &ConnectionTrafficSecrets,
) -> Option<Secret> {
    let (key, iv) = match want {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => return None,
    };
    for _ in 0..=MAX_EARLIER_UPDATES {
        let (k, i) = key_and_iv(suite, &secret);
        if k[..suite.aead.key_len()] == *key.as_ref() && i[..] == *iv.as_ref() {
            return Some(secret);
        }
        secret = next_secret(suite, &secret);
    }
    None
}

/// What a run of [`RecordLayer::open`] found besides application data.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Every complete record is processed; more input is needed.
    NeedInput,
    /// The client sent close_notify: nothing more will be read.
    Closed,
}

/// A TLS 1.3 connection's record protection, both ways.
pub struct RecordLayer {
    suite: Suite,
    rx: Direction,
    tx: Direction,
    /// The client asked for our key update: it goes out before our next
    /// record.
    update_tx: bool,
}

impl RecordLayer {
    /// Whether `suite` is one this layer implements (every TLS 1.3 suite
    /// of the ring provider).
    pub fn supports(suite: CipherSuite) -> bool {
        Suite::of(suite).is_some()
    }

    /// From what rustls handed over and the secrets the key log captured;
    /// `None` if the suite is not one ring implements here or the secrets
    /// are not this connection's.
    pub fn new(
        suite: CipherSuite,
        secrets: Secrets,
        handed: ExtractedSecrets,
    ) -> Option<RecordLayer> {
        let suite = Suite::of(suite)?;
        let Secrets { client, server } = secrets;
        let (rx_seq, rx_keys) = handed.rx;
        let (tx_seq, tx_keys) = handed.tx;
        let client = current_secret(suite, client?, &rx_keys)?;
        let server = current_secret(suite, server?, &tx_keys)?;
        Some(RecordLayer {
            suite,
            rx: Direction::new(suite, client, rx_seq),
            tx: Direction::new(suite, server, tx_seq),
            update_tx: false,
        })
    }

    /// Decrypt the complete records at the start of `input` in place,
    /// handing each one's application data to `data`; returns how many
    /// bytes were used.
    pub fn open(
        &mut self,
        input: &mut [u8],
        mut data: impl FnMut(&[u8]),
    ) -> io::Result<(usize, Opened)> {
        let mut used = 0;
        loop {
            let rest = &mut input[used..];
            if rest.len() < HEADER_LEN {
                return Ok((used, Opened::NeedInput));
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if rest[0] != CONTENT_APPLICATION_DATA || !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len)
            {
                return Err(invalid("unexpected TLS record after the handshake"));
            }
            if rest.len() < HEADER_LEN + len {
                return Ok((used, Opened::NeedInput));
            }
            let (header, body) = rest.split_at_mut(HEADER_LEN);
            let aad = Aad::from([header[0], header[1], header[2], header[3], header[4]]);
            let nonce = self.rx.nonce()?;
            let plain = self
                .rx
                .key
                .open_in_place(nonce, aad, &mut body[..len])
                .map_err(|_| invalid("TLS record failed to decrypt"))?;
            used += HEADER_LEN + len;
            // The content type is the last byte that is not padding.
            let Some(end) = plain.iter().rposition(|&b| b != 0) else {
                return Err(invalid("TLS record without a content type"));
            };
            let (content, kind) = (&plain[..end], plain[end]);
            match kind {
                CONTENT_APPLICATION_DATA => data(content),
                CONTENT_ALERT => match content {
                    // close_notify
                    [_, 0] => return Ok((used, Opened::Closed)),
                    // user_canceled, a warning that close_notify follows.
                    [1, 90] => {}
                    [_, desc] => return Err(invalid(&format!("the client sent alert {desc}"))),
                    _ => return Err(invalid("malformed TLS alert")),
                },
                CONTENT_HANDSHAKE => self.handshake(content)?,
                _ => return Err(invalid("unexpected TLS content type after the handshake")),
            }
        }
    }

    /// The only handshake message a client sends after the handshake (no
    /// post-handshake authentication is asked for): KeyUpdate, alone at
    /// the end of its record, as the key changes after it (RFC 8446 5.1).
    fn handshake(&mut self, message: &[u8]) -> io::Result<()> {
        match message {
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] if *request <= 1 => {
                self.rx.update(self.suite);
                self.update_tx |= *request == 1;
                Ok(())
            }
            _ => Err(invalid("unexpected handshake message after the handshake")),
        }
    }

    /// Append `data` (at most one record's worth) as an application data
    /// record, after our key update if one is due.
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.send_key_update_if_due(out)?;
        self.seal_record(CONTENT_APPLICATION_DATA, data, out)
    }

    /// Append a close_notify alert.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.send_key_update_if_due(out)?;
        self.seal_record(CONTENT_ALERT, &[1, 0], out)
    }

    fn send_key_update_if_due(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if self.update_tx || self.tx.seq >= TX_UPDATE_AT {
            self.seal_record(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], out)?;
            self.tx.update(self.suite);
            self.update_tx = false;
        }
        Ok(())
    }

    fn seal_record(&mut self, kind: u8, content: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        debug_assert!(content.len() < 1 << 14);
        let len = content.len() + 1 + TAG_LEN;
        let header = [CONTENT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.reserve(HEADER_LEN + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(content);
        out.push(kind);
        let nonce = self.tx.nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER_LEN..])
            .map_err(|_| io::Error::other("TLS record failed to encrypt"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8448 section 3 (simple 1-RTT handshake): the server's
    /// application traffic secret and the key and IV it gives.
    #[test]
    fn keys_from_a_secret_as_rfc_8448_derives_them() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let secret = hex(
            "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb
             6b 3a 4b 4f 1f 3f cb 63 16 43",
        );
        let suite = Suite::of(CipherSuite::TLS13_AES_128_GCM_SHA256).unwrap();
        let (key, iv) = key_and_iv(suite, &Secret::new(&secret).unwrap());
        assert_eq!(
            key[..16],
            hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")[..]
        );
        assert_eq!(iv[..], hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84")[..]);
    }
}
