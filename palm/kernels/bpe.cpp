// Byte-level BPE encoding that reproduces Hugging Face tokenizers' output for tokenizers of the
// GPT-2 / GPT-NeoX kind (ByteLevel pre-tokenizer with the GPT-2 split pattern, a BPE model
// without dropout, added tokens without strip options), several times faster: no regex engine,
// no per-token strings or offsets, and a cache of words already encoded.
//
// Plain C ABI (loaded with ctypes, no Python or torch headers, so it compiles in a second or two).
// palm/kernels/bpe.py checks a tokenizer qualifies and builds the tables. Text is UTF-8. A document that
// holds a character this encoder cannot classify exactly (unassigned in Python's Unicode tables,
// or one the tokenizer's NFC normalizer could change) is reported, and the caller encodes it
// with the reference tokenizer instead.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// Per code point, as in the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
enum : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kUnsure = 4 };
constexpr uint8_t kClassMask = 0x7f;
constexpr uint8_t kNfcSensitive = 0x80;  // NFC could change text holding this code point

struct AddedToken {
  std::string text;
  int32_t id;
};

struct Merge {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
  // std::priority_queue keeps the largest on top: make the lowest rank, then leftmost, "largest"
  bool operator<(const Merge& other) const { return rank != other.rank ? rank > other.rank : pos > other.pos; }
};

struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  int32_t len;  // bytes covered; 0 once merged into its left neighbour
};

constexpr size_t kMaxCachedWord = 256;     // bytes
constexpr size_t kMaxCacheEntries = 1 << 18;  // cleared when full: memory stays bounded (~40 MB)

class Encoder {
 public:
  const uint8_t* classes;  // 0x110000 entries, owned by the caller
  bool nfc;
  int32_t byte_ids[256];
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, new id)
  std::vector<AddedToken> raw_added;         // matched on the input text
  std::vector<AddedToken> normalized_added;  // matched after normalization (here: the same text)
  std::unordered_map<std::string, std::vector<int32_t>> cache;

  // Ids of `text` into `out` (room for len ids: every token covers at least one byte);
  // the count, or -1 when the text needs the reference tokenizer.
  int64_t encode(const char* text, int64_t len, int32_t* out) {
    int32_t* start = out;
    if (!split_added(text, 0, len, raw_added, out, [&](int64_t b, int64_t e, int32_t*& o) {
          return split_added(text, b, e, normalized_added, o,
                             [&](int64_t b2, int64_t e2, int32_t*& o2) { return pre_tokenize(text, b2, e2, o2); });
        }))
      return -1;
    return out - start;
  }

 private:
  // Leftmost-longest matches of `tokens` in text[begin, end) become their ids; the text between
  // them goes to `inner`.
  template <typename Inner>
  bool split_added(const char* text, int64_t begin, int64_t end, const std::vector<AddedToken>& tokens, int32_t*& out,
                   Inner inner) {
    if (tokens.empty()) return inner(begin, end, out);
    int64_t piece = begin;
    for (int64_t i = begin; i < end;) {
      const AddedToken* match = nullptr;
      for (const AddedToken& t : tokens) {  // sorted longest first
        if (static_cast<int64_t>(t.text.size()) <= end - i && text[i] == t.text[0] &&
            std::memcmp(text + i, t.text.data(), t.text.size()) == 0) {
          match = &t;
          break;
        }
      }
      if (!match) {
        ++i;
        continue;
      }
      if (piece < i && !inner(piece, i, out)) return false;
      *out++ = match->id;
      i += match->text.size();
      piece = i;
    }
    return piece < end ? inner(piece, end, out) : true;
  }

  // The code point at text[i] (valid UTF-8) and its byte length.
  static uint32_t decode(const char* text, int64_t i, int* len) {
    const auto* s = reinterpret_cast<const unsigned char*>(text + i);
    if (s[0] < 0x80) { *len = 1; return s[0]; }
    if (s[0] < 0xe0) { *len = 2; return ((s[0] & 0x1f) << 6) | (s[1] & 0x3f); }
    if (s[0] < 0xf0) { *len = 3; return ((s[0] & 0x0f) << 12) | ((s[1] & 0x3f) << 6) | (s[2] & 0x3f); }
    *len = 4;
    return ((s[0] & 0x07) << 18) | ((s[1] & 0x3f) << 12) | ((s[2] & 0x3f) << 6) | (s[3] & 0x3f);
  }

  // Class of the code point at text[i]; kUnsure where the text must go to the reference tokenizer.
  uint8_t class_at(const char* text, int64_t i, int* len) const {
    const uint8_t c = classes[decode(text, i, len)];
    return (nfc && (c & kNfcSensitive)) ? kUnsure : (c & kClassMask);
  }

  // End of the run of code points of class `cls` starting at i.
  int64_t run_end(const char* text, int64_t i, int64_t end, uint8_t cls, int64_t* last_start) const {
    int len;
    while (i < end && class_at(text, i, &len) == cls) {
      *last_start = i;
      i += len;
    }
    return i;
  }

  // Splits text[begin, end) as the GPT-2 pattern does and encodes each piece.
  bool pre_tokenize(const char* text, int64_t begin, int64_t end, int32_t*& out) {
    int64_t i = begin;
    while (i < end) {
      int len;
      const uint8_t cls = class_at(text, i, &len);
      if (cls == kUnsure) return false;
      int64_t last = i;
      int64_t j = text[i] == '\'' ? contraction_end(text, i, end) : i;  // 's 't 're 've 'm 'll 'd
      if (j == i) {
        uint8_t next = kSpace;
        if (text[i] == ' ' && i + 1 < end) next = class_at(text, i + 1, &len);
        if (next == kUnsure) return false;
        if (next != kSpace) {
          // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": a space joins the run after it
          j = run_end(text, i + 1, end, next, &last);
        } else if (cls != kSpace) {
          j = run_end(text, i, end, cls, &last);
        } else {
          j = run_end(text, i, end, kSpace, &last);
          // \s+(?!\S): a run followed by other text leaves its last space to start the next piece
          if (j < end && last > i) j = last;
        }
      }
      encode_piece(text + i, j - i, out);
      i = j;
    }
    return true;
  }

  static int64_t contraction_end(const char* text, int64_t i, int64_t end) {
    if (i + 1 < end) {
      const char a = text[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
      if (i + 2 < end) {
        const char b = text[i + 2];
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
      }
    }
    return i;
  }

  void encode_piece(const char* piece, int64_t len, int32_t*& out) {
    if (len == 1) {
      *out++ = byte_ids[static_cast<unsigned char>(piece[0])];
      return;
    }
    const bool cacheable = static_cast<size_t>(len) <= kMaxCachedWord;
    std::string key;
    if (cacheable) {
      key.assign(piece, len);
      auto hit = cache.find(key);
      if (hit != cache.end()) {
        out = std::copy(hit->second.begin(), hit->second.end(), out);
        return;
      }
    }
    int32_t* first = out;
    merge_bytes(piece, len, out);
    if (cacheable) {
      if (cache.size() >= kMaxCacheEntries) cache.clear();
      cache.emplace(std::move(key), std::vector<int32_t>(first, out));
    }
  }

  const std::pair<int32_t, int32_t>* find_merge(int32_t left, int32_t right) const {
    auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right));
    return it == merges.end() ? nullptr : &it->second;
  }

  // Hugging Face's BPE word merge: repeatedly apply the lowest-ranked merge present, leftmost
  // first, skipping queue entries made stale by earlier merges.
  void merge_bytes(const char* piece, int64_t len, int32_t*& out) {
    std::vector<Symbol> symbols(len);
    for (int64_t i = 0; i < len; ++i)
      symbols[i] = {byte_ids[static_cast<unsigned char>(piece[i])], static_cast<int32_t>(i - 1),
                    i + 1 < len ? static_cast<int32_t>(i + 1) : -1, 1};
    std::priority_queue<Merge> queue;
    for (int32_t i = 0; i + 1 < len; ++i)
      if (auto m = find_merge(symbols[i].id, symbols[i + 1].id)) queue.push({m->first, i, m->second});
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Symbol& left = symbols[top.pos];
      if (left.len == 0 || left.next == -1) continue;
      const Symbol& right = symbols[left.next];
      auto m = find_merge(left.id, right.id);
      if (!m || m->second != top.new_id) continue;
      const int32_t right_index = left.next;
      left.id = top.new_id;
      left.len += right.len;
      left.next = right.next;
      symbols[right_index].len = 0;
      if (left.next != -1) symbols[left.next].prev = top.pos;
      if (left.prev != -1)
        if (auto p = find_merge(symbols[left.prev].id, left.id)) queue.push({p->first, left.prev, p->second});
      if (left.next != -1)
        if (auto n = find_merge(left.id, symbols[left.next].id)) queue.push({n->first, top.pos, n->second});
    }
    for (int32_t i = 0; i != -1; i = symbols[i].next) *out++ = symbols[i].id;
  }
};

std::vector<AddedToken> added_tokens(const char* texts, const int64_t* ends, const int32_t* ids, int64_t n) {
  std::vector<AddedToken> tokens;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t begin = k ? ends[k - 1] : 0;
    if (ends[k] > begin) tokens.push_back({std::string(texts + begin, ends[k] - begin), ids[k]});
  }
  std::stable_sort(tokens.begin(), tokens.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.text.size() > b.text.size(); });
  return tokens;
}

}  // namespace

extern "C" {

// classes: 0x110000 bytes (kept by reference). byte_ids: the id of each byte's byte-level symbol.
// merges: n_merges x (left id, right id, new id) in rank order. Added tokens: contents
// concatenated, their end offsets and ids; `raw` ones are matched before normalization.
void* palm_bpe_new(const uint8_t* classes, int32_t nfc, const int32_t* byte_ids, const int32_t* merges,
                   int64_t n_merges, const char* raw_texts, const int64_t* raw_ends, const int32_t* raw_ids,
                   int64_t n_raw, const char* norm_texts, const int64_t* norm_ends, const int32_t* norm_ids,
                   int64_t n_norm) {
  auto* e = new Encoder();
  e->classes = classes;
  e->nfc = nfc != 0;
  std::memcpy(e->byte_ids, byte_ids, sizeof(e->byte_ids));
  e->merges.reserve(n_merges);
  for (int64_t r = 0; r < n_merges; ++r) {
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(merges[3 * r])) << 32) |
                         static_cast<uint32_t>(merges[3 * r + 1]);
    e->merges[key] = {static_cast<int32_t>(r), merges[3 * r + 2]};  // a repeated pair keeps its last rank, as in tokenizers
  }
  e->raw_added = added_tokens(raw_texts, raw_ends, raw_ids, n_raw);
  e->normalized_added = added_tokens(norm_texts, norm_ends, norm_ids, n_norm);
  return e;
}

void palm_bpe_free(void* encoder) { delete static_cast<Encoder*>(encoder); }

// Documents data[offsets[d], offsets[d + 1]) for d < n: each one's ids, then `eos` if >= 0, go to
// `out` (room for offsets[n] - offsets[0] + n ids) one after another; lengths[d] is the count
// written for document d, or -1 for a document left to the reference tokenizer (nothing written).
// Returns the total written.
int64_t palm_bpe_encode_batch(void* encoder, const char* data, const int64_t* offsets, int64_t n, int32_t eos,
                              int32_t* out, int64_t* lengths) {
  auto* e = static_cast<Encoder*>(encoder);
  int64_t total = 0;
  for (int64_t d = 0; d < n; ++d) {
    const int64_t count = e->encode(data + offsets[d], offsets[d + 1] - offsets[d], out + total);
    if (count < 0) {
      lengths[d] = -1;
      continue;
    }
    lengths[d] = count;
    total += count;
    if (eos >= 0) {
      out[total++] = eos;
      ++lengths[d];
    }
  }
  return total;
}

}  // extern "C"
