//! How the workspace reads its `PAGED_ATTN_*` settings: one value per variable, a default when it
//! is unset, and a refusal (never a silent fallback) when it is set to something the setting does
//! not know, so that a typo cannot run a kernel nobody asked for.

use std::env::VarError;

/// Reads one setting from the result of `std::env::var`: `unset` when the variable is absent,
/// `parse(value)` otherwise.
///
/// # Errors
/// The offending value as text (non-UTF-8 values in their escaped form) when `parse` refuses it,
/// for the caller to wrap in its own typed error with the forms it accepts.
pub fn read<T>(var: Result<String, VarError>, unset: T, parse: impl FnOnce(&str) -> Option<T>) -> Result<T, String> {
    match var {
        Err(VarError::NotPresent) => Ok(unset),
        Err(VarError::NotUnicode(v)) => Err(format!("{v:?}")),
        Ok(v) => parse(&v).ok_or(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digit(s: &str) -> Option<u8> {
        s.trim().parse().ok().filter(|&d| d < 10)
    }

    #[test]
    fn unset_parsed_and_refused() {
        assert_eq!(read(Err(VarError::NotPresent), 7, digit), Ok(7));
        assert_eq!(read(Ok(" 3 ".into()), 7, digit), Ok(3));
        assert_eq!(read(Ok("12".into()), 7, digit), Err("12".into()));
        assert_eq!(read(Ok(String::new()), 7, digit), Err(String::new()));
    }

    #[cfg(unix)]
    #[test]
    fn non_unicode_is_refused_in_escaped_form() {
        use std::os::unix::ffi::OsStringExt;
        let raw = std::ffi::OsString::from_vec(vec![b'4', 0xff]);
        let err = read(Err(VarError::NotUnicode(raw)), 7, digit).unwrap_err();
        assert_eq!(err, r#""4\xFF""#);
    }
}
