//! Checkpoints (`sluice_ledger::checkpoint`): C2SP signed notes, read from exports, from
//! `--older-checkpoint` files and from the store.
//!
//! `$ORIGIN` in the input becomes the fixed host key's origin. Checks, beyond "never panics":
//! * `parse_unverified` accepts only canonical text: the checkpoint's `body()` is exactly the
//!   note's text up to the blank line;
//! * `open` accepts only notes `parse_unverified` accepts, with the same checkpoint and the key's
//!   origin (a fuzz note is never signed, so it must not open unless it carries our signature);
//! * signing that checkpoint with the key and appending the input's other signature lines opens
//!   to the same checkpoint, unless one of those lines is malformed, claims our key with a bad
//!   signature, or there are too many.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use sluice_ledger::checkpoint::{open, parse_unverified, sign, Checkpoint, NoteError};
use sluice_ledger::HostKey;

fuzz_target!(|data: &[u8]| {
    let key = HostKey::from_signing_key(SigningKey::from_bytes(&[9u8; 32]));
    let vk = key.verifying_key();
    let note = String::from_utf8_lossy(data).replace("$ORIGIN", key.origin());
    let parsed = parse_unverified(&note);
    if let Ok(cp) = &parsed {
        let body = cp.body();
        assert!(note.starts_with(&body) && note[body.len()..].starts_with('\n'), "{body:?} is not the note's text");
    }
    match open(&note, &vk) {
        Ok(signed) => {
            assert_eq!(parsed.as_ref(), Ok(&signed.checkpoint));
            assert_eq!(signed.checkpoint.origin, key.origin());
            assert_eq!(signed.note, note);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let Ok(cp) = parsed else { return };
    let ours = Checkpoint { origin: key.origin().to_string(), ..cp };
    let signed = sign(ours.clone(), &key);
    assert_eq!(open(&signed.note, &vk).map(|s| s.checkpoint), Ok(ours.clone()));
    // Our signature plus the input's signature lines, in both orders.
    let theirs = note.split_once("\n\n").map(|(_, s)| s).unwrap_or_default();
    let (body, our_line) = signed.note.split_once("\n\n").expect("a signed note has a blank line");
    for combined in [format!("{body}\n\n{our_line}{theirs}"), format!("{body}\n\n{theirs}{our_line}")] {
        match open(&combined, &vk) {
            Ok(s) => assert_eq!(s.checkpoint, ours),
            Err(
                NoteError::BadSignatureLine { .. }
                | NoteError::BadSignature { .. }
                | NoteError::TooManySignatures
                | NoteError::ControlCharacter
                | NoteError::TooLarge,
            ) => {}
            Err(e) => panic!("our signed checkpoint with other lines added: {e}"),
        }
    }
});
