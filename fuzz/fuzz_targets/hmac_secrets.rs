//! `AVSYNC_HMAC_SECRETS` parsing: `avsync_ingress::settings::parse_hmac_secrets`.
//!
//! Every secret the fuzzer writes carries a marker that no key id or other text can hold, so
//! the property is simple: whatever the setting, the error names the setting and never holds
//! a marker or a `whsec_` secret's base64; a setting that parses has one key per entry.

#![no_main]

use avsync_ingress::settings::parse_hmac_secrets;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const MARKER: &str = "Zq7SECRET";

#[derive(Arbitrary, Debug)]
enum Entry {
    /// `whsec_<base64 of MARKER + key>`, padded or not, optionally broken by a suffix.
    Whsec {
        key: Vec<u8>,
        padded: bool,
        suffix: String,
    },
    /// `<id>=MARKER<secret>` with an id of key-id characters.
    Named { id: Vec<u8>, secret: String },
    /// Anything else, with the marker removed.
    Raw(String),
}

fuzz_target!(|input: (Vec<Entry>, bool)| {
    let (entries, spaced) = input;
    let mut texts = Vec::new();
    let mut encoded_secrets = Vec::new();
    for entry in &entries {
        texts.push(match entry {
            Entry::Whsec {
                key,
                padded,
                suffix,
            } => {
                let mut bytes = MARKER.as_bytes().to_vec();
                bytes.extend_from_slice(key);
                let mut encoded = STANDARD.encode(&bytes);
                if !padded {
                    encoded = encoded.trim_end_matches('=').to_owned();
                }
                encoded_secrets.push(encoded.clone());
                format!("whsec_{encoded}{}", suffix.replace(MARKER, ""))
            }
            Entry::Named { id, secret } => {
                let id: String = id
                    .iter()
                    .map(|b| {
                        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789_-";
                        char::from(alphabet[usize::from(*b) % alphabet.len()])
                    })
                    .collect();
                format!("{id}={MARKER}{}", secret.replace(MARKER, ""))
            }
            Entry::Raw(text) => text.replace(MARKER, ""),
        });
    }
    let setting = texts.join(if spaced { ", " } else { "," });
    match parse_hmac_secrets(&setting) {
        Ok(keys) => assert_eq!(keys.len(), setting.split(',').count()),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("AVSYNC_HMAC_SECRETS"), "{text}");
            assert!(!text.contains(MARKER), "a secret in {text:?}");
            for encoded in &encoded_secrets {
                assert!(
                    !text.contains(encoded.as_str()),
                    "a whsec_ secret in {text:?}"
                );
            }
            assert!(!format!("{e:?}").contains(MARKER), "a secret in {e:?}");
        }
    }
});
