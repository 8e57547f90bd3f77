//! Small checks of command payloads that every domain needs.

/// Checks an id chosen by a caller: 1 to 64 characters, no whitespace.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || id.chars().any(char::is_whitespace) {
        return Err(format!(
            "invalid id {id:?}: 1 to 64 characters without spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("u-1").is_ok());
        assert!(valid_id("").is_err());
        assert!(valid_id("a b").is_err());
        assert!(valid_id(&"x".repeat(65)).is_err());
        assert!(valid_id(&"x".repeat(64)).is_ok());
    }
}
