//! A local token estimate for `POST /v1/messages/count_tokens`.

use std::io;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::{ContentBlock, ImageSource, MessageContent, MessagesRequest, Tool};

/// Bytes of UTF-8 text per estimated token.
pub const BYTES_PER_TOKEN: u64 = 4;
/// Tokens added for each message (role and separators).
pub const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens added for each tool definition (its framing in the prompt).
pub const TOKENS_PER_TOOL: u64 = 16;
/// Tokens for one image, whatever its size: Anthropic's count for an image of
/// about 1.15 megapixels, the size it scales larger ones down to.
pub const TOKENS_PER_IMAGE: u64 = 1_600;

/// The `count_tokens` answer: `{"input_tokens": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCount {
    /// The estimate.
    pub input_tokens: u64,
}

/// Estimates a request's input tokens without calling anyone.
///
/// The UTF-8 bytes of every text (system, text blocks, tool results, tool
/// names, descriptions, the JSON of tool schemas and of `tool_use` inputs)
/// divided by [`BYTES_PER_TOKEN`], rounded up, plus [`TOKENS_PER_MESSAGE`]
/// per message (and for the system prompt), [`TOKENS_PER_TOOL`] per tool and
/// [`TOKENS_PER_IMAGE`] per image. Bytes rather than characters: English
/// averages about four characters a token, and text in scripts of several
/// bytes a character (CJK) comes out nearer its real, higher count. It is an
/// estimate: tokenizers differ by model, and it aims to be close, not exact.
pub fn estimate_tokens(request: &MessagesRequest) -> u64 {
    let mut count = Count::default();
    if let Some(system) = &request.system {
        count.tokens += TOKENS_PER_MESSAGE;
        count.content(system);
    }
    for message in &request.messages {
        count.tokens += TOKENS_PER_MESSAGE;
        count.content(&message.content);
    }
    for tool in request.tools.iter().flatten() {
        count.tool(tool);
    }
    count.tokens + count.bytes.div_ceil(BYTES_PER_TOKEN)
}

#[derive(Default)]
struct Count {
    bytes: u64,
    tokens: u64,
}

impl Count {
    fn text(&mut self, text: &str) {
        self.bytes += text.len() as u64;
    }

    fn json(&mut self, value: &Value) {
        let mut counter = ByteCounter(0);
        // Writing into a counter cannot fail.
        if serde_json::to_writer(&mut counter, value).is_ok() {
            self.bytes += counter.0;
        }
    }

    fn content(&mut self, content: &MessageContent) {
        match content {
            MessageContent::Text(text) => self.text(text),
            MessageContent::Blocks(blocks) => {
                for block in blocks {
                    self.block(block);
                }
            }
        }
    }

    fn block(&mut self, block: &ContentBlock) {
        match block {
            ContentBlock::Text(b) => self.text(&b.text),
            ContentBlock::Image(image) => {
                self.tokens += TOKENS_PER_IMAGE;
                if let ImageSource::Url { url } = &image.source {
                    self.text(url);
                }
            }
            ContentBlock::ToolUse(call) => {
                self.text(&call.id);
                self.text(&call.name);
                self.json(&call.input);
            }
            ContentBlock::ToolResult(result) => {
                self.text(&result.tool_use_id);
                if let Some(content) = &result.content {
                    self.content(content);
                }
            }
            // Thinking and unknown blocks: their text fields, as the model
            // would read them.
            ContentBlock::Other(value) => {
                for key in ["thinking", "text", "data"] {
                    if let Some(text) = value.get(key).and_then(Value::as_str) {
                        self.text(text);
                    }
                }
            }
        }
    }

    fn tool(&mut self, tool: &Tool) {
        self.tokens += TOKENS_PER_TOOL;
        self.text(&tool.name);
        if let Some(description) = &tool.description {
            self.text(description);
        }
        if let Some(schema) = &tool.input_schema {
            self.json(schema);
        }
    }
}

/// An `io::Write` that only counts.
struct ByteCounter(u64);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(body: &str) -> u64 {
        estimate_tokens(&MessagesRequest::from_slice(body.as_bytes()).unwrap())
    }

    #[test]
    fn estimates_are_documented_sums() {
        // 4 (message) + ceil(11 / 4) = 7
        assert_eq!(estimate(r#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#), 7);
        // system 4 + message 4 + image 1600 + ceil((3 + 8) / 4) = 1611
        assert_eq!(
            estimate(
                r#"{"model":"m","system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":[
                    {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},
                    {"type":"text","text":"describe"}]}]}"#
            ),
            1611
        );
        // 4 + tool 16 + ceil((2 + 1 + 2 + 1 + 2 + len(r#"{"type":"object"}"#)=17) / 4)
        assert_eq!(
            estimate(
                r#"{"model":"m","tools":[{"name":"ls","description":"l","input_schema":{"type":"object"}}],
                   "messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"ls","input":{}}]},
                               {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}"#
            ),
            // messages 8, tool 16, bytes: "t1"2 "ls"2 "{}"2 "t1"2 "ok"2 + "ls"2 "l"1 schema 17 = 30 -> 8
            8 + 16 + 8
        );
    }

    #[test]
    fn more_text_more_tokens() {
        let short = estimate(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let long = estimate(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "word ".repeat(1000)
        ));
        assert_eq!(long - short, 1250 - 1);
    }
}
