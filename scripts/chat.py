#!/usr/bin/env python
"""Chat with a saved model in the terminal; answers stream token by token.

    python scripts/chat.py --model outputs/llava-tiny-XXXX/stage2_instruct/final --image photo.png
    python scripts/chat.py --model DIR --do-sample --temperature 0.7 --seed 0

In the chat: /image PATH, /model DIR, /reset, /help, /quit. See ``vlmzoo.chat_cli`` for every option.
"""

import sys

from vlmzoo.chat_cli import main

if __name__ == "__main__":
    sys.exit(main())
