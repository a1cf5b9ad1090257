//! Fuzzes opening a buffer from memory: any bytes must give either a valid
//! table whose every tensor lies inside the buffer, or an error, never a
//! crash. Each accepted tensor is also exported and released through DLPack.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rzc_core::Weights;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = Weights::from_vec(data.to_vec()) else {
        return;
    };
    let len = w.bytes().len();
    for (i, t) in w.tensors().iter().enumerate() {
        assert!(t.offset >= w.data_start() && t.offset + t.nbytes <= len);
        assert_eq!(w.data(i).unwrap().len(), t.nbytes);
        if let Ok(m) = w.to_dlpack(i) {
            unsafe { ((*m).deleter.unwrap())(m) };
        }
    }
});
