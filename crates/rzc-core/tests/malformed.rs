//! The malformed-input corpus: each case gets the right error class and a
//! message that names the problem.

use rzc_core::{ErrorKind, Weights};

fn buf(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    b
}

fn check(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    let e = Weights::from_vec(bytes).expect_err(needle);
    assert_eq!(e.kind(), kind, "{}", e.message());
    assert!(
        e.message().contains(needle),
        "message {:?} lacks {needle:?}",
        e.message()
    );
}

#[test]
fn corpus() {
    use ErrorKind::*;
    check(vec![], BadFormat, "8-byte header length");
    check(vec![1, 2, 3], BadFormat, "8-byte header length");
    let mut b = 100u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    check(b, BadFormat, "runs past the end");
    check(
        u64::MAX.to_le_bytes().to_vec(),
        BadFormat,
        "exceeds the limit",
    );
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    check(b, BadFormat, "not valid UTF-8");
    check(buf("[1,2]", 0), BadFormat, "JSON object");
    check(
        buf("{\"a\":", 0),
        BadFormat,
        "not a valid safetensors JSON header",
    );
    check(
        buf(
            r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        ),
        UnsupportedDtype,
        "unknown dtype \"Q7\"",
    );
    check(
        buf(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            4,
        ),
        BadFormat,
        "overflows",
    );
    check(
        buf(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            4,
        ),
        BadFormat,
        "needs 8 bytes",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
            4,
        ),
        BadFormat,
        "run past the end",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            6,
        ),
        BadFormat,
        "overlaps",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
            6,
        ),
        BadFormat,
        "hole",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            5,
        ),
        BadFormat,
        "trailing bytes",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
            4,
        ),
        BadFormat,
        "appears twice",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}"#,
            2,
        ),
        BadFormat,
        "negative",
    );
    check(
        buf(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,0]}}"#,
            2,
        ),
        BadFormat,
        "end before they begin",
    );
    check(
        buf(
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
            1,
        ),
        BadFormat,
        "whole bytes",
    );
    check(
        buf(r#"{"__metadata__":{"k":1}}"#, 0),
        BadFormat,
        "not a valid safetensors JSON header",
    );
    check(
        buf(r#"{"a":{"dtype":"U8","shape":[1]}}"#, 0),
        BadFormat,
        "data_offsets",
    );
}

#[test]
fn truncations_of_a_valid_buffer_never_panic() {
    let good = buf(
        r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        16,
    );
    assert!(Weights::from_vec(good.clone()).is_ok());
    for cut in 0..good.len() {
        let e = Weights::from_vec(good[..cut].to_vec()).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::BadFormat,
            "cut at {cut}: {}",
            e.message()
        );
    }
}
