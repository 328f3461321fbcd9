"""The launch queue: `trainbus submit`, `trainbus agent`, `trainbus queue` and `trainbus cancel`."""
