//! Element types of safetensors buffers and their DLPack encodings.

use crate::dlpack::{DLDataType, DLDataTypeCode};

/// Every dtype the safetensors format defines (as of safetensors 0.8).
///
/// The discriminants are part of the C ABI (`rzc_dtype`): never reuse or
/// renumber one; add new dtypes at the end.
///
/// cbindgen:rename-all=ScreamingSnakeCase
/// cbindgen:prefix-with-name
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte per element.
    Bool = 0,
    /// Unsigned 8-bit integer.
    U8 = 1,
    /// Signed 8-bit integer.
    I8 = 2,
    /// Signed 16-bit integer.
    I16 = 3,
    /// Unsigned 16-bit integer.
    U16 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// Unsigned 32-bit integer.
    U32 = 6,
    /// Signed 64-bit integer.
    I64 = 7,
    /// Unsigned 64-bit integer.
    U64 = 8,
    /// IEEE half precision.
    F16 = 9,
    /// bfloat16.
    Bf16 = 10,
    /// IEEE single precision.
    F32 = 11,
    /// IEEE double precision.
    F64 = 12,
    /// Complex number made of two f32 parts.
    C64 = 13,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (torch `float8_e5m2`).
    F8E5m2 = 14,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, finite (torch `float8_e4m3fn`).
    F8E4m3 = 15,
    /// 8-bit scale format, 8 exponent bits (torch `float8_e8m0fnu`).
    F8E8m0 = 16,
    /// 8-bit float e4m3, finite, unsigned zero (torch `float8_e4m3fnuz`).
    F8E4m3Fnuz = 17,
    /// 8-bit float e5m2, finite, unsigned zero (torch `float8_e5m2fnuz`).
    F8E5m2Fnuz = 18,
    /// 4-bit float e2m1 (packed, sub-byte).
    F4 = 19,
    /// 6-bit float e2m3 (packed, sub-byte).
    F6E2m3 = 20,
    /// 6-bit float e3m2 (packed, sub-byte).
    F6E3m2 = 21,
}

// A free constant, not an associated one: cbindgen would export the latter.
const ALL: [Dtype; 22] = [
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::I32,
    Dtype::U32,
    Dtype::I64,
    Dtype::U64,
    Dtype::F16,
    Dtype::Bf16,
    Dtype::F32,
    Dtype::F64,
    Dtype::C64,
    Dtype::F8E5m2,
    Dtype::F8E4m3,
    Dtype::F8E8m0,
    Dtype::F8E4m3Fnuz,
    Dtype::F8E5m2Fnuz,
    Dtype::F4,
    Dtype::F6E2m3,
    Dtype::F6E3m2,
];

impl Dtype {
    /// All dtypes, in ABI order.
    pub fn all() -> &'static [Dtype] {
        &ALL
    }

    /// The spelling used in safetensors headers (`"F32"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::C64 => "C64",
            Dtype::F8E5m2 => "F8_E5M2",
            Dtype::F8E4m3 => "F8_E4M3",
            Dtype::F8E8m0 => "F8_E8M0",
            Dtype::F8E4m3Fnuz => "F8_E4M3FNUZ",
            Dtype::F8E5m2Fnuz => "F8_E5M2FNUZ",
            Dtype::F4 => "F4",
            Dtype::F6E2m3 => "F6_E2M3",
            Dtype::F6E3m2 => "F6_E3M2",
        }
    }

    /// Parses a safetensors header spelling (`"F32"`, `"BF16"`, ...).
    pub fn from_name(name: &str) -> Option<Dtype> {
        ALL.into_iter().find(|d| d.name() == name)
    }

    /// Converts an ABI discriminant back to a dtype.
    pub fn from_u32(value: u32) -> Option<Dtype> {
        ALL.get(value as usize).copied()
    }

    /// Size of one element in bits (4 and 6 for the packed sub-byte floats).
    pub fn bits(self) -> u32 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2m3 | Dtype::F6E3m2 => 6,
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8E5m2
            | Dtype::F8E4m3
            | Dtype::F8E8m0
            | Dtype::F8E4m3Fnuz
            | Dtype::F8E5m2Fnuz => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::I64 | Dtype::U64 | Dtype::F64 | Dtype::C64 => 64,
        }
    }

    /// Bytes taken by `numel` elements, or `None` on overflow or when the
    /// elements do not fill whole bytes (possible only for sub-byte dtypes).
    pub fn nbytes(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(u64::from(self.bits()))?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The DLPack encoding (DLPack 1.1 type codes), or `None` for dtypes that
    /// DLPack consumers cannot take as whole elements (the packed sub-byte floats).
    pub fn to_dlpack(self) -> Option<DLDataType> {
        use DLDataTypeCode::*;
        let code = match self {
            Dtype::Bool => kDLBool,
            Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => kDLUInt,
            Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => kDLInt,
            Dtype::F16 | Dtype::F32 | Dtype::F64 => kDLFloat,
            Dtype::Bf16 => kDLBfloat,
            Dtype::C64 => kDLComplex,
            Dtype::F8E5m2 => kDLFloat8_e5m2,
            Dtype::F8E4m3 => kDLFloat8_e4m3fn,
            Dtype::F8E8m0 => kDLFloat8_e8m0fnu,
            Dtype::F8E4m3Fnuz => kDLFloat8_e4m3fnuz,
            Dtype::F8E5m2Fnuz => kDLFloat8_e5m2fnuz,
            Dtype::F4 | Dtype::F6E2m3 | Dtype::F6E3m2 => return None,
        };
        Some(DLDataType {
            code: code as u8,
            bits: self.bits() as u8,
            lanes: 1,
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_official_crate() {
        for &d in Dtype::all() {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            assert_eq!(Dtype::from_u32(d as u32), Some(d));
            // The official crate spells its dtypes the same way in headers.
            let official: safetensors::Dtype =
                serde_json::from_str(&format!("\"{}\"", d.name())).unwrap();
            assert_eq!(official.bitsize() as u32, d.bits(), "{d}");
        }
        assert_eq!(Dtype::from_name("F33"), None);
        assert_eq!(Dtype::from_u32(22), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(Dtype::F32.nbytes(3), Some(12));
        assert_eq!(Dtype::F4.nbytes(3), None);
        assert_eq!(Dtype::F4.nbytes(4), Some(2));
        assert_eq!(Dtype::F64.nbytes(u64::MAX / 4), None);
    }
}
